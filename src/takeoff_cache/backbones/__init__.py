"""The backbones file: networks, their input specs and the preprocessing they take."""
