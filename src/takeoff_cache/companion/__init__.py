"""Building on the drone's companion computer over SSH.

Engines are tied to the hardware that runs them, so the build happens on the
companion: :mod:`.ssh` connects, :mod:`.bringup` checks the companion before
anything is sent, :mod:`.transfer` sends only what the build needs, and
:mod:`.remote` runs the build and verify there and reads their reports back.
"""
