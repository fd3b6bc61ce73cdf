"""geo-locate-ml: predict where a photo was taken."""
__version__ = "0.1.0"

from .runtime import pin_cpu_kernels as _pin_cpu_kernels

_pin_cpu_kernels()  # before torch is imported: the same run on AVX2 and AVX-512 machines (runtime.PORTABLE_CPU_KERNELS)


def __getattr__(name: str):
    """Lazy top-level API: ``from geolocate import Geolocator``."""
    if name in ("Geolocator", "Prediction", "CellPrediction"):
        from . import serving

        return getattr(serving, name)
    raise AttributeError(name)
