"""Pure detector cores, one module each (README "Detectors")."""
