"""Models: backbone registry (each owning its preprocessing) and heads."""
from .backbones import BACKBONES, Backbone, Preprocess, create_backbone, is_pretrained, list_backbones
from .heads import CellHead, GeoModel
from .checkpoint import load_model, save_model

__all__ = ["BACKBONES", "Backbone", "Preprocess", "create_backbone", "is_pretrained", "list_backbones", "CellHead", "GeoModel", "load_model", "save_model"]
