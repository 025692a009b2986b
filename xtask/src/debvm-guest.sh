#!/bin/bash
# The Debian VM test's scenario (`cargo xtask vm-debian`, xtask/src/debvm.rs).
#
# Runs as fwmark-debvm.service in a Debian 12 guest booted with systemd as
# PID 1, after multi-user.target. The package to test is
# /usr/local/lib/fwmark-debvm/fwmark.deb. Every step prints what it saw
# ("debvm: ..."); the last line is the verdict, "FWMARK-DEBVM: PASS" or
# "FWMARK-DEBVM: FAIL: <step>: <reason>". The unit powers the guest off.
#
#  client ns                    director (guest root ns)           rs1 / rs2 ns
#  eth0 10.77.0.2/24 --- vmd0 10.77.0.1/24, VIP 10.77.0.100 on lo
#                        fwmark@vmd0 marks, keepalived -> IPVS
#                        vmr1 10.77.1.1/24 ------------------ eth0 10.77.1.2
#                        vmr2 10.77.2.1/24 ------------------ eth0 10.77.2.2
# The real servers run busybox httpd on 80, 443 and 8080; each answers its
# own name, so the client sees which real server it reached; the client
# asks with bash's /dev/tcp.

set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C

DIR=/usr/local/lib/fwmark-debvm
DEB=$DIR/fwmark.deb
IFACE=vmd0
UNIT=fwmark@$IFACE.service
VIP=10.77.0.100
MARK=80
WORK=/run/debvm
STEP=setup

# Each line with the guest's uptime in seconds.
say() { echo "debvm: $(cut -d' ' -f1 /proc/uptime) s: $*"; }

fail() {
  journalctl --sync
  echo "debvm: ---- $UNIT journal ----"
  journalctl --no-pager -o short-monotonic -u "$UNIT" 2>&1 | tail -n 40
  echo "debvm: ---- keepalived journal ----"
  journalctl --no-pager -o short-monotonic -u keepalived.service 2>&1 | tail -n 15
  echo "FWMARK-DEBVM: FAIL: $STEP: $*"
  exit 1
}

# The client's view of one HTTP request to HOST:PORT (default host: the
# VIP): the body, which is the real server's name, or nothing. bash's
# /dev/tcp (busybox-static's wget crashes resolving even a literal address).
fetch() {
  local host=$VIP port=$1
  [ $# -eq 2 ] && host=$1 port=$2
  ip netns exec client timeout 3 bash -c \
    "exec 3<>/dev/tcp/$host/$port && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && cat <&3" 2>/dev/null |
    tail -n 1
}

# The named nftables counter's packet count.
counter() {
  nft list counter inet debvm "$1" | sed -n 's/.*packets \([0-9]*\).*/\1/p'
}

# A number in `fwmark status --iface vmd0 --json`: "key" ($2) of the
# object "section" ($1).
status_field() {
  fwmark status --iface "$IFACE" --json 2>/dev/null | tr -d '\n' |
    sed -n "s/.*\"$1\": *{[^}]*\"$2\": *\([0-9]*\).*/\1/p"
}

unit_prop() { systemctl show -P "$2" "$1"; }

# What is attached to vmd0's ingress: tc's view (cls_bpf on clsact) and
# bpftool's (tc and tcx).
attached() {
  echo "tc: $(tc filter show dev "$IFACE" ingress | tr '\n' ' ')| bpftool: $(bpftool net show dev "$IFACE" | tr '\n' ' ')"
}
has_program() {
  tc filter show dev "$IFACE" ingress | grep -q bpf ||
    bpftool net show dev "$IFACE" | grep -q "$IFACE("
}

wait_for() { # SECONDS COMMAND...: poll every 0.2 s
  local until=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < until)) || return 1
    sleep 0.2
  done
}

say "kernel $(uname -r), systemd $(systemctl --version | head -n1 | cut -d' ' -f2), $(keepalived --version 2>&1 | head -n1), multi-user reached at $(cut -d' ' -f1 /proc/uptime) s"
[ "$(cat /proc/1/comm)" = systemd ] || fail "PID 1 is $(cat /proc/1/comm), not systemd"
mkdir -p "$WORK"

# ---- topology ---------------------------------------------------------------
STEP=topology
{
  for ns in client rs1 rs2; do
    ip netns add $ns && ip -n $ns link set lo up
  done
  ip link add $IFACE type veth peer name eth0 netns client
  ip addr add 10.77.0.1/24 dev $IFACE && ip link set $IFACE up
  ip -n client addr add 10.77.0.2/24 dev eth0 && ip -n client link set eth0 up
  ip -n client route add default via 10.77.0.1
  ip addr add $VIP/32 dev lo
  for n in 1 2; do
    ip link add vmr$n type veth peer name eth0 netns rs$n
    ip addr add 10.77.$n.1/24 dev vmr$n && ip link set vmr$n up
    ip -n rs$n addr add 10.77.$n.2/24 dev eth0 && ip -n rs$n link set eth0 up
    ip -n rs$n route add default via 10.77.$n.1
    mkdir -p $WORK/rs$n && echo rs$n >$WORK/rs$n/index.html
    for port in 80 443 8080; do
      ip netns exec rs$n busybox httpd -p $port -h $WORK/rs$n
    done
  done
  echo 1 >/proc/sys/net/ipv4/ip_forward
} || fail "building the client/director/real-server network failed"
# Every packet to the VIP's web ports at the director, after TC ingress and
# before IPVS: unmarked (mark 0) and marked with the web mark.
nft -f - <<EOF || fail "nft rejected the counting table"
table inet debvm {
  counter unmarked {}
  counter marked {}
  chain pre {
    type filter hook prerouting priority mangle + 10; policy accept;
    ip daddr $VIP tcp dport { 80, 443, 8080 } meta mark 0 counter name unmarked
    ip daddr $VIP tcp dport { 80, 443, 8080 } meta mark $MARK counter name marked
  }
}
EOF
for n in 1 2; do
  got=$(fetch 10.77.$n.2 80)
  [ "$got" = rs$n ] || {
    ip netns exec rs$n ss -ltnp
    ip -n rs$n addr show dev eth0
    fail "the client cannot reach rs$n directly: $got"
  }
done
say "topology: client, director ($IFACE), rs1, rs2 up; the client reaches both real servers"

# ---- 1: install, an invalid config fails the unit, enable --now ------------
STEP="step 1 (install)"
dpkg -i "$DEB" >$WORK/dpkg-install.log 2>&1 || {
  cat $WORK/dpkg-install.log
  fail "dpkg -i fwmark.deb failed"
}
say "installed $(dpkg-query -W -f='${Package} ${Version}' fwmark); $(command -v fwmark): $(fwmark --version)"
conffile=$(dpkg-query -W -f='${Conffiles}' fwmark)
case $conffile in *"/etc/fwmark/fwmark.toml "*) ;; *) fail "/etc/fwmark/fwmark.toml is not a conffile: $conffile" ;; esac

mkdir -p /etc/fwmark
cat >/etc/fwmark/fwmark.toml <<EOF
[[service]]
name  = "web"
vip   = "$VIP"
proto = "tcp"
ports = [80, 443]
mark  = 99999999999
EOF
if systemctl start $UNIT 2>/dev/null; then
  fail "$UNIT started with an invalid config (mark out of range)"
fi
# journald takes the message from the unit's stderr asynchronously. The
# unit's journal must hold it; `systemctl status` shows only the current
# invocation's lines, which a Restart= loop may already have replaced, so
# what it shows is printed, not required.
config_error() {
  st=$(journalctl -q --no-pager -u $UNIT | grep -m1 'mark: 99999999999 is not')
}
wait_for 10 config_error || fail "the config error is not in the journal of $UNIT"
say "an invalid config fails the unit; its journal says: ${st#*]: }"
if systemctl status -l --no-pager -n 20 $UNIT | grep -q 'mark: 99999999999 is not'; then
  say "systemctl status shows the config error"
else
  say "note: systemctl status shows: $(systemctl status -l --no-pager -n 0 $UNIT | grep -m1 'Active:' | sed 's/^ *//')"
fi
systemctl stop $UNIT 2>/dev/null
systemctl reset-failed $UNIT 2>/dev/null
has_program && fail "the failed start left a program on $IFACE: $(attached)"

cat >/etc/fwmark/fwmark.toml <<EOF
# HTTP and HTTPS on the VIP under one mark (keepalived: virtual_server fwmark $MARK).
[[service]]
name  = "web"
vip   = "$VIP"
proto = "tcp"
ports = [80, 443]
mark  = $MARK
EOF
fwmark check --config /etc/fwmark/fwmark.toml >/dev/null || fail "fwmark check rejects the test's config"
# Only `systemctl reload` may apply a change (step 3): no file watching, set
# the way the unit documents per-instance options.
echo "FWMARK_ARGS=--no-watch" >/etc/fwmark/$IFACE.env

# ---- 2: keepalived starts only after fwmark is ready ------------------------
STEP="step 2 (keepalived after fwmark)"
cat >/etc/keepalived/keepalived.conf <<EOF
global_defs {
  router_id debvm
}
virtual_server fwmark $MARK {
  delay_loop 2
  lb_algo rr
  lb_kind NAT
  persistence_timeout 300
  protocol TCP
  real_server 10.77.1.2 {
    weight 1
    TCP_CHECK {
      connect_port 80
      connect_timeout 2
    }
  }
  real_server 10.77.2.2 {
    weight 1
    TCP_CHECK {
      connect_port 80
      connect_timeout 2
    }
  }
}
EOF
# What is attached at the moment keepalived starts (its first ExecStartPre).
mkdir -p /etc/systemd/system/keepalived.service.d
cat >/etc/systemd/system/keepalived.service.d/debvm-probe.conf <<EOF
[Service]
ExecStartPre=/bin/sh -c '{ tc filter show dev $IFACE ingress; bpftool net show dev $IFACE; } >$WORK/at-keepalived-start 2>&1'
EOF
systemctl daemon-reload
# Both start jobs are queued together, as at boot; the package's unit orders
# itself before keepalived.
systemctl enable --now $UNIT keepalived.service >$WORK/enable.log 2>&1 || {
  cat $WORK/enable.log
  fail "systemctl enable --now $UNIT keepalived.service failed"
}
say "systemctl enable --now $UNIT keepalived.service: both active; $UNIT: $(unit_prop $UNIT StatusText)"
ready=$(unit_prop $UNIT ActiveEnterTimestampMonotonic)
fw_start=$(unit_prop $UNIT InactiveExitTimestampMonotonic)
ka_start=$(unit_prop keepalived.service InactiveExitTimestampMonotonic)
say "monotonic us: $UNIT started $fw_start, ready (active) $ready; keepalived.service started $ka_start"
((ready > 0 && ka_start >= ready)) ||
  fail "keepalived.service started at $ka_start us, before $UNIT was ready at $ready us"
probe=$(tr '\n' ' ' <$WORK/at-keepalived-start)
say "attached to $IFACE when keepalived started: $probe"
grep -q -e bpf -e "$IFACE(" $WORK/at-keepalived-start ||
  fail "nothing was attached to $IFACE when keepalived started"
# Checked after the behaviour above, so a unit that is not Type=notify
# shows as keepalived starting too early.
[ "$(unit_prop $UNIT Type)" = notify ] || fail "$UNIT is Type=$(unit_prop $UNIT Type), not notify"
wait_for 15 sh -c "ipvsadm -L -n | grep -c -- '-> 10.77' | grep -qx 2" ||
  fail "keepalived did not configure FWM $MARK with two real servers: $(ipvsadm -L -n | tr '\n' ' ')"
say "ipvsadm: $(ipvsadm -L -n | grep -e FWM -e '->' | tr -s ' ' | tr '\n' ';')"
a=$(fetch 80)
b=$(fetch 443)
[ -n "$a" ] && [ -n "$b" ] || fail "the client's requests to $VIP:80 and :443 were not answered ('$a', '$b')"
[ "$a" = "$b" ] || fail "persistence on mark $MARK: port 80 reached $a, port 443 reached $b"
say "client -> $VIP:80 reached $a, $VIP:443 reached $b (persistence on the mark)"
marked=$(counter marked)
unmarked=$(counter unmarked)
((marked > 0 && unmarked == 0)) || fail "nftables saw $marked marked and $unmarked unmarked packets to the VIP"
say "nftables at the director: $marked packets with mark $MARK, $unmarked unmarked"

# ---- 3: systemctl reload applies a changed config ---------------------------
STEP="step 3 (reload)"
gen1=$(status_field config generation)
[ -n "$gen1" ] || fail "fwmark status --json shows no config generation"
[ -z "$(fetch 8080)" ] || fail "$VIP:8080 answered before it was configured"
sed -i 's/^ports = \[80, 443\]/ports = [80, 443, 8080]/' /etc/fwmark/fwmark.toml
sleep 2
[ "$(status_field config generation)" = "$gen1" ] ||
  fail "the changed file went live without a reload (generation $(status_field config generation)): is --no-watch in effect?"
systemctl reload $UNIT || {
  systemctl status -l --no-pager -n 5 $UNIT
  fail "systemctl reload $UNIT failed"
}
newer() { [ "$(status_field config generation)" -gt "$gen1" ] 2>/dev/null; }
wait_for 10 newer ||
  fail "the generation stayed $gen1 after systemctl reload"
gen2=$(status_field config generation)
fwmark status --iface $IFACE --json | grep -q "\"match\": *\"$VIP tcp port 8080\"" ||
  fail "the live config has no rule for $VIP tcp port 8080: $(fwmark status --iface $IFACE --json)"
c=$(fetch 8080)
[ "$c" = "$a" ] || fail "after the reload $VIP:8080 reached '$c', not $a (mark $MARK, persistence)"
say "systemctl reload: generation $gen1 -> $gen2, $VIP:8080 now marked $MARK and reached $c; $(unit_prop $UNIT StatusText)"

# ---- 4: reinstalling the package keeps marking without a gap ---------------
STEP="step 4 (upgrade)"
pid1=$(unit_prop $UNIT MainPID)
seen1=$(status_field global seen)
rm -f $WORK/stream.ok $WORK/stream.fail
# The client's stream: one request after another to the VIP, 80 then 443.
(
  while [ ! -e $WORK/stream.stop ]; do
    for port in 80 443; do
      if [ "$(fetch $port)" = "$a" ]; then echo >>$WORK/stream.ok; else echo >>$WORK/stream.fail; fi
    done
  done
) &
stream=$!
sleep 1
m0=$(counter marked)
u0=$(counter unmarked)
since=$(date '+%Y-%m-%d %H:%M:%S')
dpkg -i "$DEB" >$WORK/dpkg-upgrade.log 2>&1 || {
  cat $WORK/dpkg-upgrade.log
  fail "dpkg -i fwmark.deb (again) failed"
}
m1=$(counter marked)
wait_for 20 systemctl is-active -q $UNIT || fail "$UNIT is $(systemctl is-active $UNIT) after the reinstall"
sleep 1
touch $WORK/stream.stop
wait $stream
m2=$(counter marked)
u2=$(counter unmarked)
ok=$(wc -l <$WORK/stream.ok 2>/dev/null || echo 0)
bad=$(wc -l <$WORK/stream.fail 2>/dev/null || echo 0)
pid2=$(unit_prop $UNIT MainPID)
say "dpkg -i during the stream: $((m1 - m0)) marked packets while dpkg ran, $((m2 - m0)) in all, $((u2 - u0)) unmarked; $ok requests answered by $a, $bad not"
((m1 > m0)) || fail "no marked packet reached the director while dpkg ran: the stream did not cover the reinstall"
((u2 == u0)) || fail "$((u2 - u0)) packets to the VIP were not marked during the reinstall"
((bad == 0)) || fail "$bad of the client's requests failed during the reinstall"
((pid2 != pid1 && pid2 > 0)) || fail "the reinstall did not restart $UNIT (main pid $pid1 before, $pid2 after)"
adopted=$(journalctl -q --no-pager -u $UNIT --since "$since" | grep -m1 "adopted the")
[ -n "$adopted" ] || fail "the restarted fwmark did not log that it adopted the attachment"
gen3=$(status_field config generation)
seen3=$(status_field global seen)
daemon=$(status_field attach daemon_pid)
((daemon == pid2)) || fail "fwmark status names daemon pid $daemon, the unit runs $pid2"
((gen3 >= gen2 && seen3 >= seen1)) ||
  fail "the new fwmark did not carry the state over (generation $gen2 -> $gen3, seen $seen1 -> $seen3)"
say "restarted (pid $pid1 -> $pid2), status: generation $gen3, seen $seen1 -> $seen3, managed by pid $daemon; journal: ${adopted#*]: }"

# ---- 5: stop, then purge: nothing is left -----------------------------------
STEP="step 5 (stop, purge)"
systemctl stop $UNIT || fail "systemctl stop $UNIT failed"
say "after systemctl stop (--keep): $(attached)"
dpkg --purge fwmark >$WORK/dpkg-purge.log 2>&1 || {
  cat $WORK/dpkg-purge.log
  fail "dpkg --purge fwmark failed"
}
left=$(attached)
say "after dpkg --purge: $left"
has_program && fail "a program is still attached to $IFACE after the purge: $left"
[ -z "$(ls -A /sys/fs/bpf/fwmark 2>/dev/null)" ] ||
  fail "pins remain after the purge: $(find /sys/fs/bpf/fwmark | tr '\n' ' ')"
[ -z "$(ls -A /run/fwmark 2>/dev/null)" ] || fail "state remains after the purge: $(find /run/fwmark | tr '\n' ' ')"
[ ! -e /usr/sbin/fwmark ] || fail "/usr/sbin/fwmark remains after the purge"
[ ! -e /etc/fwmark/fwmark.toml ] || fail "/etc/fwmark/fwmark.toml remains after the purge"
[ -z "$(fetch 80)" ] || fail "$VIP:80 is still balanced after the purge (packets still marked)"
say "purged: no program on $IFACE, no pins under /sys/fs/bpf/fwmark, no /run/fwmark, the VIP no longer balanced"

echo "FWMARK-DEBVM: PASS"
