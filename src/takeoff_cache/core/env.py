"""The environment variables takeoff-cache reads, each named here only.

Every other module imports its name from here, so a variable cannot be spelled
two ways, and the secrets' list cannot miss one
(tests/scenarios/test_defined_once.py).
"""

from __future__ import annotations

# Secrets: never shown, logged or handed on to a child that does not need them.
TILES_API_KEY = "TAKEOFF_CACHE_TILES_API_KEY"
FLIGHTS_TOKEN = "TAKEOFF_CACHE_FLIGHTS_TOKEN"
KEY_PASSPHRASE = "TAKEOFF_CACHE_KEY_PASSPHRASE"
# The companion's own signing key's passphrase, when its key is encrypted (sent on stdin).
COMPANION_KEY_PASSPHRASE = "TAKEOFF_CACHE_COMPANION_KEY_PASSPHRASE"
SECRETS = (TILES_API_KEY, FLIGHTS_TOKEN, KEY_PASSPHRASE, COMPANION_KEY_PASSPHRASE)

# Who downloads: a contact (URL or e-mail) added to the User-Agent that tile servers
# and the flights API see, or the whole User-Agent (prepare/httpbody.user_agent).
CONTACT = "TAKEOFF_CACHE_CONTACT"
USER_AGENT_VAR = "TAKEOFF_CACHE_USER_AGENT"

# Fault points (core/faults.py): kill, fail or stop the process at a named point,
# or trace every point reached.
KILL_AT = "TAKEOFF_CACHE_KILL_AT"
FAIL_AT = "TAKEOFF_CACHE_FAIL_AT"
STOP_AT = "TAKEOFF_CACHE_STOP_AT"
FAULT_TRACE = "TAKEOFF_CACHE_FAULT_TRACE"

# Minutes the local Prefect API stays up unused between commands; 0 or "off":
# none stays, each command starts and stops a temporary one
# (takeoff_cache_prefect/tempapi.py).
PREFECT_IDLE_MIN = "TAKEOFF_CACHE_PREFECT_IDLE_MIN"
