"""ImageNet pixel statistics: the input normalisation every network here was trained with (one definition)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
