"""``python -m geolocate.cli`` (what ``torchrun --nproc_per_node N -m geolocate.cli train ...`` runs)."""
from . import app

app(prog_name="geolocate")
