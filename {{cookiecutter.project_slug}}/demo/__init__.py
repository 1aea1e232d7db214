"""Demo tasks: one of each shape a real service has, all signal-aware but ``add``."""
