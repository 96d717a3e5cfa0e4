package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
)

// testServer is a Server behind httptest whose every request and
// response is checked against the OpenAPI document: a response that does
// not match it, or a request the document refuses that the server
// accepted, fails the test.
type testServer struct {
	t    *testing.T
	srv  *Server
	http *httptest.Server
	key  string
}

const testKey = "test-key-0123456789"

func newTestServer(t *testing.T, opts Options) *testServer {
	t.Helper()
	if opts.APIKey == "" {
		opts.APIKey = testKey
	}
	srv, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := openAPIDoc()
	if err != nil {
		t.Fatal(err)
	}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{t: t, srv: srv, key: opts.APIKey}
	ts.http = httptest.NewServer(&checker{t: t, next: srv.Handler(), router: router})
	t.Cleanup(func() {
		ts.http.Close()
		cleanUp(t, "shut the server down", srv.Shutdown())
	})
	return ts
}

// checker validates traffic against the document.
type checker struct {
	t      *testing.T
	next   http.Handler
	router routers.Router
}

func (c *checker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	route, params, err := c.router.FindRoute(r)
	if err != nil || r.Header.Get("Upgrade") != "" {
		// Not in the document (the server must say 404 or 405), or a
		// WebSocket (checked by its test).
		rec := &recorder{ResponseWriter: w}
		c.next.ServeHTTP(rec, r)
		if err != nil && rec.status != http.StatusNotFound && rec.status != http.StatusMethodNotAllowed {
			c.t.Errorf("%s %s is not in the OpenAPI document, and the server answered %d", r.Method, r.URL.Path, rec.status)
		}
		return
	}
	in := &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, MultiError: true}}
	json := strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") || r.ContentLength == 0
	orig := r.Body
	var body []byte
	if json {
		body, _ = io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
	} else {
		// Uploads are not read here (kin-openapi would read them whole).
		in.Options.ExcludeRequestBody = true
		r.Body = http.NoBody
	}
	reqErr := openapi3filter.ValidateRequest(r.Context(), in)
	r.Body = orig
	if json {
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	rec := &recorder{ResponseWriter: w, keep: true}
	c.next.ServeHTTP(rec, r)
	if reqErr != nil && rec.status < 400 {
		c.t.Errorf("%s %s: the document refuses the request (%v), the server answered %d", r.Method, r.URL, reqErr, rec.status)
	}
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: rec.status, Header: rec.Header(),
		Options: &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true}}
	if strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") {
		out.SetBodyBytes(rec.body.Bytes())
	} else {
		out.Options.ExcludeResponseBody = true
	}
	if err := openapi3filter.ValidateResponse(r.Context(), out); err != nil {
		c.t.Errorf("%s %s: the response (%d %.300s) does not match the document: %v", r.Method, r.URL, rec.status, rec.body.String(), err)
	}
}

type recorder struct {
	http.ResponseWriter
	status int
	keep   bool
	body   bytes.Buffer
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	if r.keep && r.body.Len() < 1<<20 {
		r.body.Write(p)
	}
	return r.ResponseWriter.Write(p)
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// do sends a request with the key; body is JSON-encoded unless it is a
// []byte, string or io.Reader (sent as it is).
func (ts *testServer) do(method, path string, body any) (int, []byte) {
	ts.t.Helper()
	resp := ts.send(method, path, body, ts.key)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		ts.t.Fatalf("%s %s: read the response: %v", method, path, err)
	}
	return resp.StatusCode, b
}

func (ts *testServer) send(method, path string, body any, key string) *http.Response {
	ts.t.Helper()
	var rd io.Reader
	ctype := "application/json"
	switch b := body.(type) {
	case nil:
	case []byte:
		rd, ctype = bytes.NewReader(b), "application/octet-stream"
	case string:
		rd = strings.NewReader(b)
	case io.Reader:
		rd, ctype = b, "application/octet-stream"
	default:
		j, err := json.Marshal(b)
		if err != nil {
			ts.t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, ts.http.URL+path, rd)
	if err != nil {
		ts.t.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", ctype)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := ts.http.Client().Do(req)
	if err != nil {
		ts.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp
}

// must sends a request that must answer want, and decodes its JSON into
// out (when not nil).
func (ts *testServer) must(want int, method, path string, body, out any) []byte {
	ts.t.Helper()
	status, b := ts.do(method, path, body)
	if status != want {
		ts.t.Fatalf("%s %s: %d %s; want %d", method, path, status, b, want)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			ts.t.Fatalf("%s %s: %v in %s", method, path, err, b)
		}
	}
	return b
}

// wantError sends a request that must fail with this status and code, and
// a message that contains each of msgs.
func (ts *testServer) wantError(status int, code, method, path string, body any, msgs ...string) {
	ts.t.Helper()
	got, b := ts.do(method, path, body)
	var e apiError
	if err := json.Unmarshal(b, &e); err != nil || got != status || e.Code != code {
		ts.t.Errorf("%s %s: %d %s; want %d with code %q", method, path, got, b, status, code)
		return
	}
	for _, m := range msgs {
		if !strings.Contains(e.Message, m) {
			ts.t.Errorf("%s %s: message %q does not say %q", method, path, e.Message, m)
		}
	}
}

func sbPath(id string, rest ...string) string {
	return fmt.Sprintf("/v1/sandboxes/%s%s", id, strings.Join(rest, ""))
}
