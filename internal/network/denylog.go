package network

import (
	"log/slog"
	"net/netip"
	"sync/atomic"

	"golang.org/x/time/rate"
)

// denyLog logs refused connections and datagrams at a bounded rate: a guest
// that sends packet after packet to a denied address (a UDP flood, a SYN
// storm) must not fill the supervisor's log with a line per packet. Past
// the rate, lines are counted, and the next line logged says how many were
// dropped.
type denyLog struct {
	log        *slog.Logger
	limit      *rate.Limiter
	suppressed atomic.Int64
}

// Ten lines a second, bursts of fifty.
func newDenyLog(log *slog.Logger) *denyLog {
	return &denyLog{log: log, limit: rate.NewLimiter(10, 50)}
}

func (d *denyLog) denied(proto string, dst netip.Addr, port uint16, reason error) {
	if !d.limit.Allow() {
		d.suppressed.Add(1)
		return
	}
	args := []any{"proto", proto, "dst", netip.AddrPortFrom(dst, port).String(), "reason", reason}
	if n := d.suppressed.Swap(0); n > 0 {
		args = append(args, "suppressed", n)
	}
	d.log.Info("egress denied", args...)
}
