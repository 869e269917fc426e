"""takeoff-cache: build, sign and verify the takeoff cache of a GPS-denied drone."""

__version__ = "0.1.0"

# Version of the Manifest.json format written by this release.
MANIFEST_FORMAT = "takeoff-cache-manifest"
MANIFEST_FORMAT_VERSION = 1

# How takeoff-cache names itself to tile servers and the flights API.
USER_AGENT = f"takeoff-cache/{__version__}"
