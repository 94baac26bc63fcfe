#!/usr/bin/env bash
# Builds a Debian Vagrant box for the libvirt provider from the Debian mirror alone, for hosts that cannot
# download boxes from Vagrant Cloud (the Vagrantfile's default, debian/trixie64, comes from there).
#
#   sudo vagrant/build-box.sh [SUITE] [OUT]   # SUITE: trixie (default) or bookworm; OUT: warden-SUITE.box
#   vagrant box add --name warden/trixie64 warden-trixie.box
#   cd vagrant && WARDEN_BOX=warden/trixie64 vagrant up --provider=libvirt
#
# Needs root, debootstrap, qemu-utils (qemu-img), fdisk (sfdisk), util-linux (losetup) and e2fsprogs. The box is
# what Vagrant expects of a base box: a `vagrant` user (password `vagrant`, passwordless sudo) that accepts
# Vagrant's well-known insecure key (Vagrant replaces it with a fresh key on the first `vagrant up`),
# OpenSSH, rsync for the synced folder, DHCP on the first NIC (eth0), GRUB on a serial console. Debian's stock
# kernel has BTF, the BPF LSM built in (enabled here on the kernel command line, as Warden needs) and
# cgroup v2 only.
set -euo pipefail

SUITE=${1:-trixie}
OUT=$(realpath -m "${2:-warden-$SUITE.box}")
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SIZE_GB=${BOX_SIZE_GB:-16}

[ "$(id -u)" -eq 0 ] || { echo "build-box.sh: run as root (loop devices, mounts, chroot)" >&2; exit 1; }
for tool in debootstrap qemu-img sfdisk losetup mkfs.ext4 tar; do
  command -v "$tool" >/dev/null || { echo "build-box.sh: $tool is missing" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/warden-box.XXXXXX)
root=$work/root
loop=""
cleanup() {
  set +e
  for m in dev/pts dev proc sys ""; do
    mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
  done
  [ -n "$loop" ] && { partx -d "$loop" 2>/dev/null; losetup -d "$loop"; }
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf '==> %s\n' "$*" >&2; }

log "disk: $SIZE_GB GiB raw image, one bootable ext4 partition"
truncate -s "${SIZE_GB}G" "$work/disk.raw"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$work/disk.raw"
loop=$(losetup --show -f -P "$work/disk.raw")
part=${loop}p1
[ -b "$part" ] || partx -a "$loop" 2>/dev/null || true    # hosts without udev (containers)
for _ in $(seq 1 50); do [ -b "$part" ] && break; sleep 0.1; done
[ -b "$part" ] || { echo "build-box.sh: $part did not appear (no partition scan on loop devices?)" >&2; exit 1; }
mkfs.ext4 -q -L warden-root "$part"
uuid=$(blkid -s UUID -o value "$part")
mkdir -p "$root"
mount "$part" "$root"

log "debootstrap $SUITE from $MIRROR"
debootstrap --include=linux-image-amd64,grub-pc,systemd-sysv,openssh-server,ifupdown,isc-dhcp-client,sudo,rsync,ca-certificates,curl,locales,zstd \
  --components=main "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

log "system configuration"
cat >"$root/etc/fstab" <<EOF
UUID=$uuid / ext4 errors=remount-ro 0 1
EOF
echo "warden-box" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 warden-box\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://security.debian.org/debian-security $SUITE-security main
EOF
# The first NIC is eth0 (net.ifnames=0 below), on DHCP, which also writes /etc/resolv.conf.
cat >"$root/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
allow-hotplug eth0
iface eth0 inet dhcp
EOF
rm -f "$root/etc/resolv.conf"     # debootstrap copied the build host's
cat >"$root/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 net.ifnames=0 lsm=landlock,lockdown,yama,integrity,apparmor,bpf"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
EOF
mkdir -p "$root/etc/ssh/sshd_config.d"
echo "UseDNS no" >"$root/etc/ssh/sshd_config.d/vagrant.conf"

mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
insecure_key=$(cat ${VAGRANT_INSECURE_KEY:-/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub} \
  2>/dev/null | head -n1 || true)
[ -n "$insecure_key" ] || { echo "build-box.sh: Vagrant's insecure public key not found (is vagrant installed?)" >&2; exit 1; }
chroot "$root" /bin/bash -euo pipefail -s "$loop" "$insecure_key" <<'CHROOT'
loop=$1 key=$2
export DEBIAN_FRONTEND=noninteractive
systemctl enable ssh
useradd -m -s /bin/bash -U vagrant
echo 'vagrant:vagrant' | chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/vagrant
chmod 0440 /etc/sudoers.d/vagrant
install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.ssh
echo "$key" >/home/vagrant/.ssh/authorized_keys
chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys
chmod 0600 /home/vagrant/.ssh/authorized_keys
sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' /etc/locale.gen && locale-gen >/dev/null
grub-install --target=i386-pc --modules="part_msdos ext2" "$loop" 2>&1 | grep -v '^Installation finished' || true
update-grub 2>/dev/null
apt-get clean
rm -f /etc/ssh/ssh_host_*     # regenerated on the first boot, so two VMs from one box never share keys
cat >/etc/systemd/system/ssh-hostkeys.service <<'UNIT'
[Unit]
Description=Generate SSH host keys on the first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
systemctl enable ssh-hostkeys.service
truncate -s 0 /etc/machine-id
CHROOT
# update-grub inside the chroot names the loop device; the VM sees its disk by UUID.
sed -i "s|root=/dev/loop[0-9]*p1|root=UUID=$uuid|g" "$root/boot/grub/grub.cfg"
grep -q "root=UUID=$uuid" "$root/boot/grub/grub.cfg" || { echo "build-box.sh: grub.cfg has no root=UUID" >&2; exit 1; }

for m in dev/pts dev proc sys ""; do umount "$root/$m"; done
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"
loop=""

log "box: qcow2 image, metadata.json, Vagrantfile -> $OUT"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box.img"
rm -f "$work/disk.raw"
cat >"$work/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $SIZE_GB}
EOF
cat >"$work/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "kvm"
  end
end
EOF
tar -C "$work" -cf "$OUT" metadata.json Vagrantfile box.img
log "done: $(du -h "$OUT" | cut -f1) $OUT"
