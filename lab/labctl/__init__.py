"""The local lab: disposable systemd hosts standing in for EC2, behind the emulated AWS API.

Each lab (selected by LAB_NAME, default ``demo``) has its own bridge, subnet, loopback port for the
AWS emulator and state folder ``.lab/<name>/``; ``down`` removes everything ``up`` made. Hosts are
systemd-nspawn containers booted from one cached Debian 12 image through an overlayfs each, in their
own network namespace on the bridge. Only the Python standard library is used, so ``lab down`` works
even without the project's virtualenv.

One module per job:
  common     settings (paths, ports, names), LabError and small helpers (run, ip, log)
  state      the lab's record (``lab.json``: Lab, Host) and the processes it started
  network    subnet and port choice, the bridge, per-host namespaces, the route safety check
  image      the cached base image (``lab/build-image``)
  services   the AWS emulator, apt proxy, git mirror and daemon, wheel server
  hosts      per-host roots, cgroups, the nspawn supervisor, SSH to the hosts
  inventory  the lab's inventory source and ``lab env``
  cli        ``lab/lab up | down | status | env | ssh`` (and the internal ``_host``)
"""
