"""Pure detector cores, one module each (SPEC §4)."""
