"""geo-locate-ml: predict where a photo was taken."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API: ``from geolocate import Geolocator``."""
    if name in ("Geolocator", "Prediction", "CellPrediction"):
        from . import serving

        return getattr(serving, name)
    raise AttributeError(name)
