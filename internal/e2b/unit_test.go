package e2b

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestGuestPath(t *testing.T) {
	for _, c := range []struct{ in, user, want string }{
		{"/tmp/x", "", "/tmp/x"},
		{"rel/x", "", "/root/rel/x"},
		{"~/x", "root", "/root/x"},
		{"~", "user", "/home/user"},
		{"a/../../etc", "", "/etc"},
		{"/a//b/", "", "/a/b"},
	} {
		if got, err := guestPath(c.in, c.user); err != nil || got != c.want {
			t.Errorf("guestPath(%q, %q) = %q, %v; want %q", c.in, c.user, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "a\x00b"} {
		if _, err := guestPath(bad, ""); err == nil {
			t.Errorf("guestPath(%q) accepted", bad)
		}
	}
}

// TestSignature checks /files URL signatures against vectors the e2b SDK's
// own getSignature made (e2b 2.51.0).
func TestSignature(t *testing.T) {
	ok := &signed{path: "/tmp/a b.txt", op: "read", sig: "v1_Uk64tWsrf0RqcyDI8e0S1bgSVKw3FZFa1TQcGNTr2M4"}
	if !ok.valid("tok123") {
		t.Error("the SDK's signature without expiry refused")
	}
	if ok.valid("other") {
		t.Error("a signature made with another token accepted")
	}
	wrongOp := *ok
	wrongOp.op = "write"
	if wrongOp.valid("tok123") {
		t.Error("a read signature accepted for a write")
	}
	exp := &signed{path: "/x", op: "write", user: "root", exp: "1896304617", sig: "v1_2qENFNZ2EqgJY0kCE4gClRwSs/ruTQGDAZEuvd095r8"}
	if time.Now().Unix() < 1896304617 && !exp.valid("tok123") {
		t.Error("the SDK's signature with expiry refused")
	}
	expired := *exp
	expired.exp = "1000"
	if expired.valid("tok123") {
		t.Error("an expired (and so differently signed) signature accepted")
	}
	var none *signed
	if none.valid("tok123") {
		t.Error("no signature accepted")
	}
}

func TestParseList(t *testing.T) {
	// What the SDK sends for { team: 'a b&c', 'k=1': 'v' }.
	q, _ := url.ParseQuery("metadata=" + url.QueryEscape("team=a%2520b%2526c&k%253D1=v") + "&state=running,paused&limit=5&order=desc")
	lq, err := parseList(q, true)
	if err != nil {
		t.Fatal(err)
	}
	if lq.metadata["team"] != "a b&c" || lq.metadata["k=1"] != "v" || len(lq.metadata) != 2 {
		t.Errorf("metadata %v", lq.metadata)
	}
	if strings.Join(lq.states, ",") != "running,paused" || lq.limit != 5 || !lq.desc {
		t.Errorf("parsed %+v", lq)
	}
}

func TestHeaders(t *testing.T) {
	h := http.Header{}
	if keepaliveOf(h) != 0 {
		t.Error("keepalive without the header")
	}
	for in, want := range map[string]time.Duration{"50": 50 * time.Second, "0": 0, "x": 0, "100000": 600 * time.Second} {
		h.Set("Keepalive-Ping-Interval", in)
		if got := keepaliveOf(h); got != want {
			t.Errorf("keepalive %q = %v, want %v", in, got, want)
		}
	}
	for in, want := range map[string]string{"Basic cm9vdDo=": "root", "Basic dXNlcjo": "user", "Bearer x": "", "Basic !!": "", "": ""} {
		if got := basicUser(in); got != want {
			t.Errorf("basicUser(%q) = %q, want %q", in, got, want)
		}
	}
}
