"""The PathFLIP model: shared Q-Former over regions and slide, text encoder, text-region attention, losses."""

from .config import PathFLIPConfig
from .losses import region_sigmoid_loss, slide_contrastive_loss
from .modeling import GroundingResult, PathFLIP, SlideEncoding, SlideInput, default_bert_dir
from .regions import RegionLayout, group_regions

__all__ = ["GroundingResult", "PathFLIP", "PathFLIPConfig", "RegionLayout", "SlideEncoding", "SlideInput",
           "default_bert_dir", "group_regions", "region_sigmoid_loss", "slide_contrastive_loss"]
