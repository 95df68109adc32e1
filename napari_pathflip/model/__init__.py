"""The PathFLIP model: the network (modeling.py), the cached slide encoding (encoding.py), where a text is on a slide
(grounding.py: the heatmap scores), whether a slide shows it (scoring.py), and the files it loads (checkpoint.py)."""

from .checkpoint import TEXT_TOWER_PACKAGE, default_bert_dir, load_tokenizer
from .config import PathFLIPConfig
from .encoding import GroundingResult, SlideEncoding
from .losses import region_sigmoid_loss, slide_contrastive_loss
from .modeling import PathFLIP, SlideInput
from .regions import RegionLayout, group_regions

__all__ = ["TEXT_TOWER_PACKAGE", "GroundingResult", "PathFLIP", "PathFLIPConfig", "RegionLayout", "SlideEncoding",
           "SlideInput", "default_bert_dir", "group_regions", "load_tokenizer", "region_sigmoid_loss",
           "slide_contrastive_loss"]
