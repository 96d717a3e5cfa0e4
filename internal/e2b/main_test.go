package e2b

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/smolvm/smolvm/internal/e2b/proto/filesystem/filesystemconnect"
	"github.com/smolvm/smolvm/internal/e2b/proto/process/processconnect"
	"github.com/smolvm/smolvm/internal/server"
	"github.com/smolvm/smolvm/internal/testutil"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if err := testutil.CloseWarm(); err != nil {
		fmt.Fprintln(os.Stderr, "e2b tests:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func warmHome(t testing.TB) string { return testutil.WarmHome(t) }

const testKey = "test-key-0123456789"

// apiServer is the E2B API over a registry of the warm home, on a loopback
// httptest server.
type apiServer struct {
	t   testing.TB
	url string
	reg *server.Registry
	h   *Handler
}

func newAPIServer(t testing.TB, defTimeout time.Duration) *apiServer {
	t.Helper()
	home := warmHome(t)
	reg, err := server.NewRegistry(context.Background(), server.RegistryOptions{Home: home, DefaultTimeout: defTimeout})
	if err != nil {
		t.Fatal(err)
	}
	h := New(reg, testKey, slog.Default())
	ts := httptest.NewServer(h)
	t.Cleanup(func() {
		ts.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		list, _ := reg.List(ctx, nil)
		for _, sb := range list {
			if err := reg.Delete(ctx, sb.ID); err != nil {
				t.Errorf("delete sandbox %s: %v", sb.ID, err)
			}
		}
		if err := reg.Close(); err != nil {
			t.Errorf("close the registry: %v", err)
		}
	})
	return &apiServer{t: t, url: ts.URL, reg: reg, h: h}
}

// call makes a control-plane call with the test's key and decodes the JSON
// answer into out (when not nil); it returns the status.
func (s *apiServer) call(method, path string, body any, out any) int {
	s.t.Helper()
	return s.callKey(testKey, method, path, body, out)
}

func (s *apiServer) callKey(key, method, path string, body any, out any) int {
	s.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, s.url+path, rd)
	req.Header.Set("X-API-Key", key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			s.t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

// create makes a sandbox through the control plane.
func (s *apiServer) create(body map[string]any) sandboxJSON {
	s.t.Helper()
	var sb sandboxJSON
	if st := s.call("POST", "/v2/sandboxes", body, &sb); st != http.StatusCreated {
		s.t.Fatalf("create: status %d", st)
	}
	return sb
}

// envdClients are Connect clients of one sandbox's envd, with the SDK's
// JSON codec and headers.
type envdClients struct {
	proc processconnect.ProcessClient
	fs   filesystemconnect.FilesystemClient
}

func (s *apiServer) envd(sb sandboxJSON) envdClients {
	hdr := connect.WithInterceptors(headerInterceptor{id: sb.SandboxID, token: sb.EnvdAccessToken})
	return envdClients{
		proc: processconnect.NewProcessClient(http.DefaultClient, s.url, connect.WithProtoJSON(), hdr),
		fs:   filesystemconnect.NewFilesystemClient(http.DefaultClient, s.url, connect.WithProtoJSON(), hdr),
	}
}

// headerInterceptor adds the headers the SDK sends to envd.
type headerInterceptor struct{ id, token string }

func (h headerInterceptor) set(hd http.Header) {
	hd.Set("E2b-Sandbox-Id", h.id)
	if h.token != "" {
		hd.Set("X-Access-Token", h.token)
	}
}

func (h headerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		h.set(req.Header())
		return next(ctx, req)
	}
}

func (h headerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		h.set(conn.RequestHeader())
		return conn
	}
}

func (h headerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// files makes an envd /files call.
func (s *apiServer) files(method string, sb sandboxJSON, query string, ctype string, body io.Reader) (int, []byte) {
	s.t.Helper()
	req, _ := http.NewRequest(method, s.url+"/files?"+query, body)
	req.Header.Set("E2b-Sandbox-Id", sb.SandboxID)
	req.Header.Set("X-Access-Token", sb.EnvdAccessToken)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}
