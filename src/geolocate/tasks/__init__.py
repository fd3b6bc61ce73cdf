"""Decode-time tasks on top of a model's outputs: refinement of the answer point inside the top cells."""
