"""``python -m geolocate.predict path/to/image.jpg [--json] [--model models/best.pt]``."""
from .cli.predict import main

if __name__ == "__main__":
    main()
