"""The cancel storm (``make loadtest``); ``baseline.py`` is the URLconf its server mounts."""
