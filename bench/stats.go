package bench

import (
	"encoding/json"
	"math"
	"slices"
	"time"
)

// Stats summarise a sample of durations.
type Stats struct {
	N      int
	Min    time.Duration
	Median time.Duration
	P95    time.Duration
	Max    time.Duration
}

// Summarize computes min, median, 95th percentile and max of ds. The median
// of an even count is the mean of the two middle values; the 95th
// percentile is the nearest-rank one (the smallest value with at least 95%
// of the sample at or below it). An empty sample gives the zero Stats.
func Summarize(ds []time.Duration) Stats {
	if len(ds) == 0 {
		return Stats{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	rank := int(math.Ceil(0.95 * float64(n))) // 1-based
	return Stats{N: n, Min: s[0], Median: med, P95: s[rank-1], Max: s[n-1]}
}

// ms is a duration in milliseconds, rounded to the microsecond.
func ms(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }

type statsJSON struct {
	N        int     `json:"n"`
	MinMS    float64 `json:"min_ms"`
	MedianMS float64 `json:"median_ms"`
	P95MS    float64 `json:"p95_ms"`
	MaxMS    float64 `json:"max_ms"`
}

// MarshalJSON writes the figures in milliseconds with microsecond precision.
func (s Stats) MarshalJSON() ([]byte, error) {
	return json.Marshal(statsJSON{s.N, ms(s.Min), ms(s.Median), ms(s.P95), ms(s.Max)})
}

// UnmarshalJSON reads what MarshalJSON wrote.
func (s *Stats) UnmarshalJSON(b []byte) error {
	var j statsJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	d := func(v float64) time.Duration { return time.Duration(math.Round(v * 1e6)) }
	*s = Stats{N: j.N, Min: d(j.MinMS), Median: d(j.MedianMS), P95: d(j.P95MS), Max: d(j.MaxMS)}
	return nil
}
