"""Models: backbone registry (each owning its preprocessing), head registry, the model file."""
from .backbones import BACKBONES, Backbone, Preprocess, backbone_for, create_backbone, is_pretrained, list_backbones
from .heads import HEADS, CellHead, GeoModel, Head, create_head, list_heads, register_head
from .outputs import Decoded, GeoOutput
from .fusion import FUSIONS, Fusion, create_fusion, list_fusions, register_fusion
from .checkpoint import load_model, save_model

__all__ = ["BACKBONES", "Backbone", "Preprocess", "backbone_for", "create_backbone", "is_pretrained", "list_backbones", "HEADS", "CellHead",
           "GeoModel", "Head", "create_head", "list_heads", "register_head", "Decoded", "GeoOutput", "load_model", "save_model",
           "FUSIONS", "Fusion", "create_fusion", "list_fusions", "register_fusion"]
