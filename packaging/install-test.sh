#!/usr/bin/env bash
# Installs egressd's .deb into a fresh Debian root of its own and checks, in order:
#   1. dpkg -i refuses it for its missing dependencies, and apt installs them (nftables,
#      iproute2, ...);
#   2. the files are where the README says, with their modes and owners; the unit is enabled;
#      `egressd check-config` works from the installed paths, also as the daemon's user;
#   3. a boot of that root with systemd as PID 1 (systemd-nspawn -b, private network): the
#      service reaches active (running) with its STATUS= line, runs as egressd with only
#      CAP_NET_ADMIN and CAP_NET_RAW, reloads, passes `systemd-analyze verify`, and stops
#      cleanly, taking its nftables tables with it;
#   4. upgrade to the next revision keeps a locally edited conffile, and a rollback to the
#      first revision works;
#   5. remove keeps the configuration and the state; purge (and autoremove of the dependencies)
#      leaves the same file list as before the installation.
#
#   packaging/install-test.sh EGRESSD.deb EGRESSD-NEXT-REVISION.deb
#
# Needs root, debootstrap, systemd-container and a Debian mirror ($DEBIAN_MIRROR, default
# http://deb.debian.org/debian). The root is a tmpfs in a temp dir of this run, removed on exit; downloaded
# packages are cached in $EGRESSD_INSTALL_TEST_CACHE (default /var/cache/egressd-install-test).
# EGRESSD_INSTALL_TEST_BOOT: "auto" (default) skips the boot loudly when systemd-nspawn cannot
# boot here, "require" fails instead, "no" skips it.
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 EGRESSD.deb EGRESSD-NEXT-REVISION.deb" >&2; exit 2; }
deb=$(realpath "$1")
deb_next=$(realpath "$2")
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${EGRESSD_INSTALL_TEST_CACHE:-/var/cache/egressd-install-test}
boot=${EGRESSD_INSTALL_TEST_BOOT:-auto}
work=$(mktemp -d /tmp/egressd-install-test.XXXXXX)
root=$work/root
machine=egressd-it-$$
started=$(date +%s.%N)
proc_mounted=
tmpfs_mounted=

cleanup() {
  local rc=$?
  if [ -n "$proc_mounted" ]; then umount -l "$root/proc" 2>/dev/null || true; fi
  if [ -n "$tmpfs_mounted" ]; then umount -l "$root" 2>/dev/null || true; fi
  # Nothing may stay mounted inside before the tree goes.
  if grep -q " $work" /proc/mounts; then
    echo "install-test: mounts left under $work, not removing it" >&2
  else
    rm -rf "$work"
  fi
  say "done (exit $rc)"
}
say() { printf '[%6.1fs] %s\n' "$(awk -v s="$started" -v n="$(date +%s.%N)" 'BEGIN { print n - s }')" "$*"; }
fail() { echo "install-test: FAIL: $*" >&2; exit 1; }
trap cleanup EXIT

for tool in debootstrap dpkg-deb; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install debootstrap)"
done
[ "$(id -u)" = 0 ] || fail "needs root"

# The root lives in memory (about 400 MB): dpkg's fsyncs and the final removal cost seconds on
# a tmpfs and up to a minute on a busy disk.
mkdir -p "$root"
mount -t tmpfs -o size=2g,mode=0755 egressd-install-test "$root"
tmpfs_mounted=1

say "debootstrap --variant=minbase $suite (cache: $cache)"
mkdir -p "$cache"
debootstrap --variant=minbase --cache-dir="$cache" "$suite" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }

# Commands inside the root: systemd-nspawn (a container sharing the host's network, for apt),
# or a plain chroot with /proc when nspawn cannot run here.
nspawn=(systemd-nspawn -q --register=no --keep-unit --machine="$machine" -D "$root")
if command -v systemd-nspawn >/dev/null && "${nspawn[@]}" --pipe /bin/true 2>/dev/null; then
  # (nspawn complains about /run not being a tmpfs on some hosts; that line is noise.)
  in_root() {
    "${nspawn[@]}" --pipe --setenv=DEBIAN_FRONTEND=noninteractive "$@" < /dev/null \
      2> >(grep -v 'Attempted to remove disk file system' >&2)
  }
  say "commands run in the root through systemd-nspawn"
else
  mount -t proc proc "$root/proc"
  proc_mounted=1
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  in_root() { DEBIAN_FRONTEND=noninteractive chroot "$root" "$@" < /dev/null; }
  say "systemd-nspawn cannot run here: using chroot"
fi
apt_get() { in_root apt-get -q -y -o Dpkg::Use-Pty=0 "$@"; }

# systemd itself, for the boot (a minbase root has no init); part of the baseline.
can_boot=
if [ "$boot" != no ] && command -v systemd-nspawn >/dev/null && [ -z "$proc_mounted" ]; then
  say "installing systemd into the root for the boot check"
  apt_get install --no-install-recommends systemd > "$work/apt-systemd.log" 2>&1 \
    || { tail -20 "$work/apt-systemd.log"; fail "installing systemd in the root"; }
  can_boot=1
fi
apt_get clean >/dev/null

skip_boot() {
  [ "$boot" = require ] && fail "$1 (EGRESSD_INSTALL_TEST_BOOT=require)"
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
  printf '!!! SKIPPED the boot check: %s\n' "$1"
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n'
  can_boot=
}
[ -n "$can_boot" ] || [ "$boot" = no ] || skip_boot "systemd-nspawn cannot run here"

# Boots the root (private network) with /usr/local/sbin/egressd-probe as a oneshot that runs
# once egressd's start job is done and ends by powering off. nspawn's output: $work/boot.log.
boot_root() {
  cat > "$root/etc/systemd/system/egressd-probe.service" <<'UNIT'
[Unit]
Description=egressd install test probe
After=egressd.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/egressd-probe
UNIT
  ln -sf /etc/systemd/system/egressd-probe.service \
    "$root/etc/systemd/system/multi-user.target.wants/egressd-probe.service"
  local t
  t=$(date +%s)
  timeout 180 "${nspawn[@]}" -b --private-network --console=pipe < /dev/null > "$work/boot.log" 2>&1 || true
  rm -f "$root/etc/systemd/system/egressd-probe.service" "$root/usr/local/sbin/egressd-probe" \
    "$root/etc/systemd/system/multi-user.target.wants/egressd-probe.service"
  say "boot finished after $(($(date +%s) - t)) s"
}

# A first boot before the baseline, so that the traces any boot leaves (apt's timer stamps,
# /etc/hosts) are part of it and the comparison at the end is about the package alone.
if [ -n "$can_boot" ]; then
  say "first boot, before the baseline"
  printf '#!/bin/sh\ntouch /first-boot.ok\nsystemctl poweroff --no-block\n' > "$root/usr/local/sbin/egressd-probe"
  chmod 0755 "$root/usr/local/sbin/egressd-probe"
  boot_root
  if [ -f "$root/first-boot.ok" ]; then
    rm -f "$root/first-boot.ok"
  else
    tail -40 "$work/boot.log"
    skip_boot "systemd-nspawn -b did not boot the root"
  fi
fi

# The file list the purge must return to. Volatile or bookkeeping trees are left out: /proc,
# /sys, /dev, /run, /tmp, logs, caches, apt's lists, dpkg's database backups.
snapshot() {
  (cd "$root" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
      -o -path ./tmp -o -path ./var/tmp -o -path ./var/log -o -path ./var/cache \
      -o -path ./var/lib/apt -o -path ./var/backups -o -name '*-old' \) -prune \
      -o -printf '%p %M %U:%G\n' | sort) > "$1"
}
snapshot "$work/before.txt"

cp "$deb" "$root/var/tmp/egressd.deb"
cp "$deb_next" "$root/var/tmp/egressd-next.deb"

say "dpkg -i: must stop at the missing dependencies"
if in_root dpkg -i /var/tmp/egressd.deb > "$work/dpkg-i.log" 2>&1; then
  cat "$work/dpkg-i.log"
  fail "dpkg -i succeeded in a minimal root: are the dependencies (nftables, iproute2) declared?"
fi
grep -q "depends on nftables" "$work/dpkg-i.log" || { cat "$work/dpkg-i.log"; fail "dpkg -i did not stop at nftables"; }
say "apt-get -f install: the dependencies"
apt_get -f install > "$work/apt-f.log" 2>&1 || { cat "$work/apt-f.log"; fail "apt-get -f install"; }
status=$(in_root dpkg-query -W -f='${Status}' egressd)
[ "$status" = "install ok installed" ] || fail "egressd is '$status' after apt-get -f install"
for dep in nft ip kill; do
  in_root sh -c "command -v $dep" >/dev/null || fail "$dep missing after installing the dependencies"
done

say "installed files"
# Owners by the root's own user and group names (the host's may differ).
expect() { # path mode owner:group
  local got user group
  got=$(stat -c '%a %u %g' "$root$1" 2>/dev/null) || fail "$1 is missing"
  set -- "$1" "$2" "$3" $got
  user=$(awk -F: -v id="$5" '$3 == id { print $1 }' "$root/etc/passwd")
  group=$(awk -F: -v id="$6" '$3 == id { print $1 }' "$root/etc/group")
  [ "$4 $user:$group" = "$2 $3" ] || fail "$1 is '$4 $user:$group', expected '$2 $3'"
}
expect /usr/bin/egressd 755 root:root
expect /lib/systemd/system/egressd.service 644 root:root
expect /etc/egressd 750 root:egressd
expect /etc/egressd/egressd.toml 640 root:egressd
expect /var/lib/egressd 750 egressd:egressd
expect /usr/share/man/man1/egressd.1.gz 644 root:root
expect /usr/share/man/man1/egressd-run.1.gz 644 root:root
expect /usr/share/bash-completion/completions/egressd 644 root:root
expect /usr/share/zsh/vendor-completions/_egressd 644 root:root
expect /usr/share/fish/vendor_completions.d/egressd.fish 644 root:root
expect /usr/share/doc/egressd/copyright 644 root:root
expect /usr/share/egressd/monitoring/egressd-alerts.yml 644 root:root
expect /usr/share/egressd/monitoring/grafana-dashboard.json 644 root:root
expect /usr/share/egressd/kubernetes/crds.yaml 644 root:root
expect /usr/share/egressd/kubernetes/rbac.yaml 644 root:root
[ "$(readlink "$root/etc/systemd/system/multi-user.target.wants/egressd.service")" = /lib/systemd/system/egressd.service ] \
  || fail "egressd.service is not enabled (no multi-user.target.wants link)"
in_root dpkg-query -W -f='${Conffiles}\n' egressd | grep -q '/etc/egressd/egressd.toml' \
  || fail "/etc/egressd/egressd.toml is not a conffile"
out=$(in_root egressd check-config) || fail "egressd check-config: $out"
echo "  $out"
out=$(in_root runuser -u egressd -- egressd check-config) || fail "check-config as user egressd: $out"
echo "  as egressd: $out"
echo "  $(in_root egressd --version)"

if [ -n "$can_boot" ]; then
  say "boot with systemd as PID 1 (systemd-nspawn -b --private-network), egressd enabled"
  # Test-only: manage_forwarding on, so that the sandbox's one writable /proc/sys path is
  # exercised. Removed after the boot.
  mkdir -p "$root/etc/systemd/system/egressd.service.d"
  printf '[Service]\nEnvironment=EGRESSD_DATAPLANE__MANAGE_FORWARDING=true\n' \
    > "$root/etc/systemd/system/egressd.service.d/install-test.conf"
  cat > "$root/usr/local/sbin/egressd-probe" <<'PROBE'
#!/bin/sh
exec > /egressd-probe.out 2>&1
echo "== show"
systemctl show -p ActiveState -p SubState -p Result -p NRestarts -p StatusText egressd.service
pid=$(systemctl show -p MainPID --value egressd.service)
echo "user=$(ps -o user= -p "$pid")"
grep -E '^Cap(Eff|Amb|Bnd):' "/proc/$pid/status"
echo "forwarding=$(cat /proc/sys/net/ipv4/ip_forward)"
echo "== tables"
nft list tables
echo "== status"
systemctl status --no-pager egressd.service
echo "== cli"
egressd status
echo "== reload"
systemctl reload egressd.service; echo "reload-rc=$?"
sleep 1
systemctl show -p ActiveState -p SubState egressd.service | sed 's/^/after-reload-/'
echo "== verify"
systemd-analyze verify --man=no /lib/systemd/system/egressd.service
echo "verify-rc=$?"
echo "== security"
systemd-analyze security --no-pager egressd.service | tail -1
echo "== watchdog"
# A hung daemon (stopped: no round, no ping): after WatchdogSec=10s systemd aborts it (and
# sends SIGCONT so that the abort lands) and Restart=on-failure brings it back.
old=$(systemctl show -p MainPID --value egressd.service)
kill -STOP "$old"
new=$old
for _ in $(seq 1 40); do
  sleep 1
  new=$(systemctl show -p MainPID --value egressd.service)
  st=$(systemctl show -p ActiveState --value egressd.service)
  [ "$new" != "$old" ] && [ "$new" != 0 ] && [ "$st" = active ] && break
done
echo "watchdog-restarted=$([ "$new" != "$old" ] && [ "$new" != 0 ] && echo yes || echo no)"
systemctl show -p NRestarts -p ActiveState -p StatusText egressd.service | sed 's/^/after-watchdog-/'
echo "== stop"
systemctl stop egressd.service
systemctl show -p ActiveState -p Result egressd.service | sed 's/^/after-stop-/'
echo "tables-after-stop=$(nft list tables | grep -c egressd)"
echo "== journal"
journalctl -u egressd.service --no-pager -o short-monotonic
echo "== end"
systemctl poweroff --no-block
PROBE
  chmod 0755 "$root/usr/local/sbin/egressd-probe"
  boot_root
  probe=$root/egressd-probe.out
  if [ ! -f "$probe" ] || ! grep -q '^== end' "$probe"; then
    tail -40 "$work/boot.log"
    [ -f "$probe" ] && cat "$probe"
    fail "the boot did not run the probe through"
  fi
  sed 's/^/  | /' "$probe"
  has() { grep -qE "$1" "$probe" || fail "boot: expected a line matching '$1' (probe output above)"; }
  has '^ActiveState=active$'
  has '^SubState=running$'
  has '^StatusText=standby for 0 gateways, leader [^ ]+, term [0-9]+$'
  has '^NRestarts=0$'
  has '^user=egressd$'
  has '^CapEff:[[:space:]]+0000000000003000$'
  has '^CapAmb:[[:space:]]+0000000000003000$'
  has '^forwarding=1$'
  has 'table inet egressd'
  has 'Active: active \(running\)'
  has '^reload-rc=0$'
  has '^after-reload-ActiveState=active$'
  has '^verify-rc=0$'
  # systemd-analyze verify says nothing about a good unit.
  [ "$(sed -n '/^== verify$/,/^verify-rc=/p' "$probe" | wc -l)" = 2 ] || fail "systemd-analyze verify printed something"
  has '^watchdog-restarted=yes$'
  has '^after-watchdog-NRestarts=1$'
  has '^after-watchdog-ActiveState=active$'
  has 'Watchdog timeout'
  has '^after-stop-ActiveState=inactive$'
  has '^after-stop-Result=success$'
  has '^tables-after-stop=0$'
  has 'ready: joined the cluster and converged the data plane'
  has 'configuration reloaded'
  grep -A1 '^== security' "$probe" | tail -1 | sed 's/^/  live /'
  rm -rf "$probe" "$root/etc/systemd/system/egressd.service.d"
fi

say "upgrade to the next revision with a locally edited conffile"
echo "# edited locally" >> "$root/etc/egressd/egressd.toml"
in_root dpkg -i /var/tmp/egressd-next.deb > "$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "upgrade"; }
grep -q '^# edited locally$' "$root/etc/egressd/egressd.toml" || fail "the upgrade replaced the edited conffile"
expect /etc/egressd/egressd.toml 640 root:egressd
echo "  $(in_root dpkg-query -W -f='${Package} ${Version} ${Status}' egressd)"
say "rollback to the first revision"
in_root dpkg -i /var/tmp/egressd.deb > "$work/rollback.log" 2>&1 || { cat "$work/rollback.log"; fail "rollback"; }
echo "  $(in_root dpkg-query -W -f='${Package} ${Version} ${Status}' egressd)"
in_root egressd check-config > /dev/null || fail "check-config after the rollback"

say "remove: the configuration and the state stay"
in_root dpkg -r egressd > "$work/remove.log" 2>&1 || { cat "$work/remove.log"; fail "dpkg -r"; }
[ ! -e "$root/usr/bin/egressd" ] || fail "/usr/bin/egressd left after remove"
[ ! -e "$root/lib/systemd/system/egressd.service" ] || fail "the unit left after remove"
[ -f "$root/etc/egressd/egressd.toml" ] || fail "remove deleted the conffile"
[ -d "$root/var/lib/egressd" ] || fail "remove deleted the state directory"
status=$(in_root dpkg-query -W -f='${Status}' egressd)
[ "$status" = "deinstall ok config-files" ] || fail "after remove: '$status'"

say "purge, and autoremove the dependencies: back to the file list of before"
in_root dpkg --purge egressd > "$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "dpkg --purge"; }
apt_get autoremove --purge > "$work/autoremove.log" 2>&1 || { cat "$work/autoremove.log"; fail "autoremove"; }
for gone in /etc/egressd /var/lib/egressd /etc/systemd/system/egressd.service \
  /etc/systemd/system/multi-user.target.wants/egressd.service; do
  [ ! -e "$root$gone" ] && [ ! -L "$root$gone" ] || fail "$gone left after purge"
done
apt_get clean >/dev/null
snapshot "$work/after.txt"
# One tolerated difference, not egressd's: netbase (pulled in through the dependencies'
# Recommends) creates /etc/hosts in its postinst when there is none, and purging netbase keeps it.
tolerated='> ./etc/hosts -rw-r--r-- 0:0'
diff "$work/before.txt" "$work/after.txt" | grep '^[<>]' > "$work/diff.txt" || true
if grep -qvxF "$tolerated" "$work/diff.txt"; then
  echo "files that differ from before the installation (< before, > after):"
  head -50 "$work/diff.txt"
  fail "purge left the system different from before"
fi
echo "  the same $(wc -l < "$work/before.txt") paths, modes and owners as before the installation$(
  [ -s "$work/diff.txt" ] && echo " (plus netbase's /etc/hosts)")"
# The system user stays, as Debian packages' users do (files it owns may remain elsewhere).
grep -q '^egressd:' "$root/etc/passwd" && echo "  the egressd system user remains (Debian practice)"
say "PASS"
