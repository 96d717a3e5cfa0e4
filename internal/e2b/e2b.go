// Package e2b is smolvm's E2B-compatible API: the control plane the e2b
// SDK calls with its API key (create, list, get, kill, timeout, pause,
// connect) and envd, the in-sandbox daemon the SDK talks to for commands
// and files (Connect-RPC process.Process and filesystem.Filesystem, GET and
// POST /files, GET /health), routed by the E2b-Sandbox-Id header. Both are
// translated to calls on the server's sandbox registry and the library's
// *smolvm.VM; nothing runs in the guest but the smolvm agent.
//
// The SDK needs only E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL pointed
// at the server.
package e2b

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/e2b/proto/filesystem/filesystemconnect"
	"github.com/smolvm/smolvm/internal/e2b/proto/process/processconnect"
	"github.com/smolvm/smolvm/internal/errdefs"
	"github.com/smolvm/smolvm/internal/server"
)

// EnvdVersion is the envd version smolvm reports: the SDK turns features
// on by it. 0.5.7 is the highest whose features smolvm has: closing stdin
// (0.5.2) and octet-stream uploads (0.5.7); file metadata (0.6.2) and watch
// events with entries (0.6.3) it has not.
const EnvdVersion = "0.5.7"

// Registry is what the API needs of the server's sandbox registry
// (*server.Registry).
type Registry interface {
	Create(ctx context.Context, req server.CreateRequest) (*server.Sandbox, error)
	Get(ctx context.Context, id string) (*server.Sandbox, error)
	List(ctx context.Context, metadata map[string]string) ([]*server.Sandbox, error)
	Delete(ctx context.Context, id string) error
	SetTimeout(ctx context.Context, id string, d time.Duration) error
	Pause(ctx context.Context, id string) error
	Resume(ctx context.Context, id string, timeout time.Duration) (*server.Sandbox, error)
	VM(ctx context.Context, id string) (*smolvm.VM, error)
}

var _ Registry = (*server.Registry)(nil)

// Patterns are the http.ServeMux patterns the handler serves; mount it on
// each (or on "/", beside /v1/).
var Patterns = []string{
	"/sandboxes", "/sandboxes/", "/v2/sandboxes", "/v2/sandboxes/",
	"/files", "/health",
	"/" + processconnect.ProcessName + "/", "/" + filesystemconnect.FilesystemName + "/",
}

// Handler serves the E2B-compatible API.
type Handler struct {
	reg    Registry
	apiKey string
	log    *slog.Logger
	mux    *http.ServeMux

	mu        sync.Mutex
	sandboxes map[string]*sandboxState

	stop     chan struct{} // closed by StopStreams
	stopOnce sync.Once
}

// sandboxState is what envd keeps of one sandbox beside the registry: its
// commands, which outlive the requests that started them.
type sandboxState struct {
	ctx    context.Context // ends when the sandbox is gone
	cancel context.CancelFunc
	procs  *procTable

	watchMu sync.Mutex
	watches int
}

// New returns the E2B-compatible API over reg. apiKey, when set, is
// required in X-API-Key on the control plane; envd calls carry the
// sandbox's access token instead (issued at create).
func New(reg Registry, apiKey string, log *slog.Logger) *Handler {
	if log == nil {
		log = slog.Default()
	}
	h := &Handler{reg: reg, apiKey: apiKey, log: log, mux: http.NewServeMux(), sandboxes: map[string]*sandboxState{},
		stop: make(chan struct{})}
	h.controlRoutes()
	e := &envd{h: h}
	opts := []connect.HandlerOption{connect.WithReadMaxBytes(maxRPCBytes), connect.WithSendMaxBytes(maxRPCBytes)}
	h.mux.Handle(processconnect.NewProcessHandler(&processService{e: e}, opts...))
	h.mux.Handle(filesystemconnect.NewFilesystemHandler(&filesystemService{e: e}, opts...))
	h.mux.HandleFunc("GET /health", e.health)
	h.mux.HandleFunc("GET /files", e.download)
	h.mux.HandleFunc("POST /files", e.upload)
	return h
}

// maxRPCBytes bounds one Connect-RPC message either way.
const maxRPCBytes = 4 << 20

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// StopStreams ends the streams (commands' output, directory watches)
// cleanly, for a server shutting down; the commands keep running in their
// sandboxes.
func (h *Handler) StopStreams() { h.stopOnce.Do(func() { close(h.stop) }) }

// errStopping ends a stream when the server shuts down.
func errStopping() error {
	return connect.NewError(connect.CodeUnavailable, errors.New("the server is shutting down: the sandbox and its commands keep running; connect again when it is back"))
}

// state returns envd's state of a sandbox the registry has.
func (h *Handler) state(id string) *sandboxState {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.sandboxes[id]
	if st == nil {
		ctx, cancel := context.WithCancel(context.Background())
		st = &sandboxState{ctx: ctx, cancel: cancel, procs: newProcTable()}
		h.sandboxes[id] = st
	}
	return st
}

// forget drops envd's state of a sandbox that is gone.
func (h *Handler) forget(id string) {
	h.mu.Lock()
	st := h.sandboxes[id]
	delete(h.sandboxes, id)
	h.mu.Unlock()
	if st != nil {
		st.cancel()
	}
}

// prune forgets the sandboxes the registry no longer has (deleted through
// another API, or expired).
func (h *Handler) prune(ctx context.Context) {
	h.mu.Lock()
	ids := make([]string, 0, len(h.sandboxes))
	for id := range h.sandboxes {
		ids = append(ids, id)
	}
	h.mu.Unlock()
	for _, id := range ids {
		if _, err := h.reg.Get(ctx, id); errors.Is(err, smolvm.ErrNotFound) {
			h.forget(id)
		}
	}
}

// apiError is the control plane's error body; the SDK reads code (404,
// 409) and message from it.
type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, apiError{Code: status, Message: msg})
}

// writeErr reports a library or registry error with its kind's status.
func writeErr(w http.ResponseWriter, err error) {
	status := errdefs.HTTPStatus(err)
	if status == 499 {
		return // the client is gone
	}
	writeError(w, status, err.Error())
}

// keyOK tells whether key is the API key (constant time).
func (h *Handler) keyOK(key string) bool {
	if h.apiKey == "" {
		return true
	}
	return subtle.ConstantTimeCompare([]byte(key), []byte(h.apiKey)) == 1
}

// connectErr maps a library error to a Connect error with its kind's code.
func connectErr(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	code := connect.CodeInternal
	switch {
	case errors.Is(err, smolvm.ErrNotFound), errors.Is(err, fs.ErrNotExist):
		code = connect.CodeNotFound
	case errors.Is(err, smolvm.ErrExists), errors.Is(err, fs.ErrExist):
		code = connect.CodeAlreadyExists
	case errors.Is(err, smolvm.ErrInvalid):
		code = connect.CodeInvalidArgument
	case errors.Is(err, fs.ErrPermission):
		code = connect.CodePermissionDenied
	case errors.Is(err, smolvm.ErrInUse):
		code = connect.CodeFailedPrecondition
	case errors.Is(err, smolvm.ErrNotRunning), errors.Is(err, smolvm.ErrUnavailable):
		code = connect.CodeUnavailable
	case errors.Is(err, smolvm.ErrUnsupported):
		code = connect.CodeUnimplemented
	case errors.Is(err, smolvm.ErrCapacity):
		code = connect.CodeResourceExhausted
	case errors.Is(err, context.DeadlineExceeded):
		code = connect.CodeDeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = connect.CodeCanceled
	}
	return connect.NewError(code, err)
}

// decodeBase64 reads standard base64 with or without padding.
func decodeBase64(s string) (string, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		b, err = base64.RawStdEncoding.DecodeString(s)
	}
	return string(b), err
}

// guestPath resolves a path the SDK sends: relative paths and "~" are
// under the user's home, as envd does.
func guestPath(p, user string) (string, error) {
	if p == "" {
		return "", fmt.Errorf("%w: path missing", smolvm.ErrInvalid)
	}
	if strings.ContainsRune(p, 0) {
		return "", fmt.Errorf("%w: path %q has a NUL byte", smolvm.ErrInvalid, p)
	}
	home := "/root"
	if user != "" && user != "root" {
		home = "/home/" + user
	}
	if p == "~" || strings.HasPrefix(p, "~/") {
		p = home + p[1:]
	}
	if !path.IsAbs(p) {
		p = path.Join(home, p)
	}
	return path.Clean(p), nil
}
