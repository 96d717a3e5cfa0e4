package bench

import (
	"encoding/json"
	"testing"
	"time"
)

func msd(v ...float64) []time.Duration {
	out := make([]time.Duration, len(v))
	for i, x := range v {
		out[i] = time.Duration(x * float64(time.Millisecond))
	}
	return out
}

func TestSummarize(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name string
		in   []time.Duration
		want Stats
	}{
		{"empty", nil, Stats{}},
		{"one", msd(7), Stats{N: 1, Min: 7 * ms, Median: 7 * ms, P95: 7 * ms, Max: 7 * ms}},
		{"odd unsorted", msd(5, 1, 3), Stats{N: 3, Min: ms, Median: 3 * ms, P95: 5 * ms, Max: 5 * ms}},
		{"even: mean of the middle two", msd(4, 1, 2, 3), Stats{N: 4, Min: ms, Median: 2500 * time.Microsecond, P95: 4 * ms, Max: 4 * ms}},
		// Nearest rank: ceil(0.95*20) = 19th of 20.
		{"twenty", msd(20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1),
			Stats{N: 20, Min: ms, Median: 10500 * time.Microsecond, P95: 19 * ms, Max: 20 * ms}},
		// ceil(0.95*10) = 10th of 10: the max.
		{"ten", msd(1, 2, 3, 4, 5, 6, 7, 8, 9, 100), Stats{N: 10, Min: ms, Median: 5500 * time.Microsecond, P95: 100 * ms, Max: 100 * ms}},
		{"equal", msd(2, 2, 2), Stats{N: 3, Min: 2 * ms, Median: 2 * ms, P95: 2 * ms, Max: 2 * ms}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := append([]time.Duration(nil), tt.in...)
			if got := Summarize(tt.in); got != tt.want {
				t.Errorf("Summarize(%v) = %+v, want %+v", tt.in, got, tt.want)
			}
			for i := range in {
				if in[i] != tt.in[i] {
					t.Fatalf("Summarize changed its input: %v, was %v", tt.in, in)
				}
			}
		})
	}
}

func TestSummarizeP95Of100(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	if got := Summarize(ds).P95; got != 95*time.Millisecond {
		t.Errorf("p95 of 1..100 ms = %v, want 95ms", got)
	}
}

func TestStatsJSON(t *testing.T) {
	s := Stats{N: 3, Min: 1234567 * time.Nanosecond, Median: 2 * time.Millisecond, P95: 1500 * time.Microsecond, Max: 3 * time.Second}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"n":3,"min_ms":1.235,"median_ms":2,"p95_ms":1.5,"max_ms":3000}`
	if string(b) != want {
		t.Errorf("json = %s, want %s", b, want)
	}
	var back Stats
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	want2 := s
	want2.Min = 1235 * time.Microsecond // rounded to the microsecond
	if back != want2 {
		t.Errorf("round trip = %+v, want %+v", back, want2)
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tqemu-system-x86\nVmPeak:\t 1000 kB\nVmRSS:\t  131072 kB\nThreads:\t4\n"
	got, err := parseVmRSS(status)
	if err != nil || got != 128<<20 {
		t.Errorf("parseVmRSS = %d, %v; want %d", got, err, 128<<20)
	}
	if _, err := parseVmRSS("Name:\tx\n"); err == nil {
		t.Error("parseVmRSS without a VmRSS line: no error")
	}
	if _, err := parseVmRSS("VmRSS:\t12 MB\n"); err == nil {
		t.Error("parseVmRSS with an odd unit: no error")
	}
}

func TestParseLdd(t *testing.T) {
	out := `	linux-vdso.so.1 (0x00007ffd)
	libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f62)
	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f62)
	/lib64/ld-linux-x86-64.so.2 (0x00007f627dca6000)
`
	libs, loader, err := parseLdd(out)
	if err != nil {
		t.Fatal(err)
	}
	if loader != "ld-linux-x86-64.so.2" {
		t.Errorf("loader = %q", loader)
	}
	want := map[string]string{
		"libz.so.1": "/lib/x86_64-linux-gnu/libz.so.1", "libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6",
		"ld-linux-x86-64.so.2": "/lib64/ld-linux-x86-64.so.2",
	}
	if len(libs) != len(want) {
		t.Errorf("libs = %v, want %v", libs, want)
	}
	for k, v := range want {
		if libs[k] != v {
			t.Errorf("libs[%q] = %q, want %q", k, libs[k], v)
		}
	}
	if _, _, err := parseLdd("\tnot a dynamic executable\n"); err == nil {
		t.Error("parseLdd of a static binary: no error")
	}
}
