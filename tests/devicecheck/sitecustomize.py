"""Installs the device-rule checker in every Python process started with this directory on PYTHONPATH.

Active only with MMSCALE_DEVICECHECK=1 (see devicecheck.py); reports go to MMSCALE_DEVICECHECK_OUT.
"""

import os

if os.environ.get("MMSCALE_DEVICECHECK") == "1":
    import devicecheck

    devicecheck.install()
    if os.environ.get("MMSCALE_DEVICECHECK_OUT"):
        devicecheck.write_report_at_exit(os.environ["MMSCALE_DEVICECHECK_OUT"])
