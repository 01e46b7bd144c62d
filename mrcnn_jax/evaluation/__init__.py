"""Host-side evaluation (NumPy + pycocotools): COCO results, COCOeval, drawing.

``coco``: detections -> COCO results (mask pasting, RLE), ``COCOEvaluator``.
``backends``: COCOeval by pycocotools or faster-coco-eval.
``workers``: pasting and encoding in worker processes.
``distributed``: every process's results to process 0, its metrics back.
``draw``: results drawn on an image.
"""
