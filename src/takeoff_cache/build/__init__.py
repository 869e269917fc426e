"""Building a takeoff cache: the request, its checks and the build's phases."""
