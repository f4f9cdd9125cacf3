"""What runs beside and after training, on any model: Grad-CAM (``gradcam``), heat maps over images
(``overlay``), params and MACs in the paper's convention (``profile``), export to other runtimes
(``export``), the paper's tables as data (``paper``). Imports the attention library and torch alone, so
that the training engine and the scripts can both use it."""
