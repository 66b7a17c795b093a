"""The Debian libraries Open3D's headless renderer needs, and how to install the missing ones.

Open3D's OffscreenRenderer runs Filament on Vulkan; without a GPU it uses Mesa's CPU driver
(llvmpipe/lavapipe from mesa-vulkan-drivers). tools/setup_env.sh installs the same list.
"""

import shutil
import subprocess

OPEN3D_PACKAGES = ("libusb-1.0-0", "libgl1", "libegl1", "libgomp1", "libvulkan1", "mesa-vulkan-drivers")


def missing_packages(packages=OPEN3D_PACKAGES):
    """Names in `packages` that dpkg does not list as installed.

    Returns [] where dpkg does not exist (not Debian/Ubuntu): there we cannot tell, and the
    renderer's own error is the message.
    """
    if shutil.which("dpkg-query") is None:
        return []
    missing = []
    for name in packages:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", name], capture_output=True, text=True
        )
        if out.returncode != 0 or out.stdout.strip() != "installed":
            missing.append(name)
    return missing


def install_command(packages):
    """The exact apt line that installs `packages`."""
    return "sudo apt-get install -y " + " ".join(packages)


def open3d_missing():
    """(missing package names, the apt line that installs them or "" when none is missing)."""
    missing = missing_packages()
    return missing, install_command(missing) if missing else ""
