package server

import (
	"net"
	"net/http"
	"net/url"
)

// LocalOnly guards a server that has no API key, which listens on loopback
// only: a request must name a loopback host (Host header) and, when it
// comes from a web page (Origin), a loopback origin. Without it any web
// page the host's user visits could drive the API: by DNS rebinding (a
// name that resolves to 127.0.0.1 makes the page same-origin), or with
// cross-site requests and WebSockets, which browsers send without asking.
func LocalOnly(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !LoopbackHost(r.Host) {
			writeJSON(w, http.StatusForbidden, apiError{Code: "forbidden",
				Message: "host " + r.Host + " is not a loopback name: a server without an API key answers only requests to 127.0.0.1 or localhost (give it a key with --api-key-file or $SMOLVM_API_KEY to serve other names)"})
			return
		}
		if o := r.Header.Get("Origin"); o != "" {
			if u, err := url.Parse(o); err != nil || !LoopbackHost(u.Host) {
				writeJSON(w, http.StatusForbidden, apiError{Code: "forbidden",
					Message: "requests from web pages of origin " + o + " are refused by a server without an API key"})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// LoopbackHost says whether a host or host:port names this machine's
// loopback (localhost, 127.0.0.0/8, ::1).
func LoopbackHost(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
