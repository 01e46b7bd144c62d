"""Host-side evaluation (NumPy + pycocotools): COCO results, COCOeval, drawing.

``coco``: detections -> COCO results (mask pasting, RLE), ``COCOEvaluator``.
``draw``: results drawn on an image.
"""
