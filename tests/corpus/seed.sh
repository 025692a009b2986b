# The source text's rules (Piranha documentation, section 12.3.1), with
# n.n.n.n = 192.0.2.10. Its second rule has the typo `-t mangle-A`: iptables
# refuses it, and so must `fwmark import` (with a clear message).
/sbin/modprobe ip_tables
/sbin/iptables -t mangle -A PREROUTING -p tcp \
	    -d 192.0.2.10/32 --dport 80 -j MARK --set-mark 80
/sbin/iptables -t mangle-A PREROUTING -p tcp \
               -d 192.0.2.10/32 --dport 443 -j MARK --set-mark 80
