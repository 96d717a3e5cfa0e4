package server

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// A server without a key refuses what a web page could send it: a request
// to a rebound name, and a request from a non-loopback origin.
func TestLocalOnly(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	h := LocalOnly(ok)
	for _, c := range []struct {
		host, origin string
		want         int
	}{
		{"127.0.0.1:7420", "", http.StatusNoContent},
		{"localhost:7420", "", http.StatusNoContent},
		{"[::1]:7420", "", http.StatusNoContent},
		{"localhost", "http://localhost:3000", http.StatusNoContent},
		{"rebound.example:7420", "", http.StatusForbidden},
		{"10.0.0.5:7420", "", http.StatusForbidden},
		{"127.0.0.1:7420", "https://evil.example", http.StatusForbidden},
		{"127.0.0.1:7420", "null", http.StatusForbidden},
	} {
		r := httptest.NewRequest("POST", "/v1/sandboxes", nil)
		r.Host = c.host
		if c.origin != "" {
			r.Header.Set("Origin", c.origin)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("Host %q Origin %q: %d; want %d (%s)", c.host, c.origin, w.Code, c.want, w.Body)
		}
	}
}
