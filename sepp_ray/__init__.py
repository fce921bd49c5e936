"""sepp-ray."""
