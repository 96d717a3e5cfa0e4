package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/errdefs"
)

// maxJSONBody bounds a JSON request body.
const maxJSONBody = 1 << 20

// routes mounts the native API. Every handler reads what it needs from
// the request and the registry: no state of its own.
func (s *Server) routes() {
	s.mux.HandleFunc("GET /v1/openapi.json", serveOpenAPI)
	for pattern, h := range map[string]handler{
		"POST /v1/sandboxes":                          s.createSandbox,
		"GET /v1/sandboxes":                           s.listSandboxes,
		"GET /v1/sandboxes/{id}":                      s.getSandbox,
		"DELETE /v1/sandboxes/{id}":                   s.deleteSandbox,
		"POST /v1/sandboxes/{id}/pause":               s.pauseSandbox,
		"POST /v1/sandboxes/{id}/resume":              s.resumeSandbox,
		"POST /v1/sandboxes/{id}/timeout":             s.setTimeout,
		"POST /v1/sandboxes/{id}/exec":                s.exec,
		"GET /v1/sandboxes/{id}/exec/stream":          s.execStream,
		"GET /v1/sandboxes/{id}/files":                s.readFile,
		"PUT /v1/sandboxes/{id}/files":                s.writeFile,
		"DELETE /v1/sandboxes/{id}/files":             s.removeFile,
		"GET /v1/sandboxes/{id}/files/stat":           s.statFile,
		"GET /v1/sandboxes/{id}/files/list":           s.listFiles,
		"POST /v1/sandboxes/{id}/files/mkdir":         s.makeDir,
		"GET /v1/sandboxes/{id}/archive":              s.getArchive,
		"PUT /v1/sandboxes/{id}/archive":              s.putArchive,
		"GET /v1/sandboxes/{id}/env":                  s.getEnv,
		"PATCH /v1/sandboxes/{id}/env":                s.updateEnv,
		"GET /v1/sandboxes/{id}/ports":                s.listPorts,
		"POST /v1/sandboxes/{id}/ports":               s.exposePort,
		"DELETE /v1/sandboxes/{id}/ports/{host_port}": s.closePort,
		"POST /v1/sandboxes/{id}/snapshots":           s.createSnapshot,
		"GET /v1/snapshots":                           s.listSnapshots,
		"DELETE /v1/snapshots/{name}":                 s.deleteSnapshot,
		"POST /v1/snapshots/{name}/restore":           s.restoreSnapshot,
		"GET /v1/images":                              s.listImages,
		"POST /v1/sandboxes/{id}/browser":             s.startBrowser,
		"GET /v1/sandboxes/{id}/browser":              s.getBrowser,
		"DELETE /v1/sandboxes/{id}/browser":           s.stopBrowser,
		"POST /v1/sandboxes/{id}/browser/screenshot":  s.screenshot,
	} {
		s.mux.Handle(pattern, s.v1(h))
	}
	// Anything else under /v1 is a JSON 404, not the mux's text one.
	s.mux.Handle("/v1/", s.v1(func(w http.ResponseWriter, r *http.Request) error {
		return fmt.Errorf("%w: no %s %s in the API (see GET /v1/openapi.json)", smolvm.ErrNotFound, r.Method, r.URL.Path)
	}))
}

// handler is a /v1 handler: an error it returns is written as the API's
// error body (unless it has written a response already).
type handler func(w http.ResponseWriter, r *http.Request) error

// v1 checks the key and writes a handler's error.
func (s *Server) v1(h handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.KeyOK(bearer(r)) {
			writeError(w, errKey)
			return
		}
		rw := &trackingWriter{ResponseWriter: w}
		if err := h(rw, r); err != nil {
			if rw.wrote {
				s.log.Debug("request failed after its response began", "path", r.URL.Path, "err", err)
				return
			}
			if errdefs.HTTPStatus(err) >= 500 {
				s.log.Warn("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
			}
			writeError(w, err)
		}
	})
}

// trackingWriter notes whether a response was begun.
type trackingWriter struct {
	http.ResponseWriter
	wrote bool
}

func (w *trackingWriter) WriteHeader(code int) {
	w.wrote = true
	w.ResponseWriter.WriteHeader(code)
}

func (w *trackingWriter) Write(p []byte) (int, error) {
	w.wrote = true
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController (and the WebSocket upgrade) reach
// the connection.
func (w *trackingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// bearer is the key of an Authorization: Bearer header.
func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

var errKey = errors.New("missing or wrong API key: send it as 'Authorization: Bearer KEY' (the key smolvm serve was given with --api-key-file or $SMOLVM_API_KEY)")

// errTooLarge is a body or file over its bound.
var errTooLarge = errors.New("too large")

// apiError is the error body of every /v1 call.
type apiError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// statusOf is the HTTP status and code of an error: the library's kinds
// through errdefs, and the few errors only the server has.
func statusOf(err error) (int, string) {
	var mbe *http.MaxBytesError
	switch {
	case errors.Is(err, errKey):
		return http.StatusUnauthorized, "unauthorized"
	case errors.As(err, &mbe), errors.Is(err, errTooLarge), errors.Is(err, smolvm.ErrFileTooLarge):
		return http.StatusRequestEntityTooLarge, "too_large"
	case errors.Is(err, fs.ErrPermission):
		return http.StatusForbidden, "forbidden"
	case errors.Is(err, fs.ErrNotExist):
		return http.StatusNotFound, "not_found"
	}
	status := errdefs.HTTPStatus(err)
	code := errdefs.Code(err)
	switch {
	case status == http.StatusGatewayTimeout:
		code = "timeout"
	case status == 499:
		code = "canceled"
	}
	return status, code
}

func writeError(w http.ResponseWriter, err error) {
	status, code := statusOf(err)
	msg := err.Error()
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		msg = fmt.Sprintf("the request body is larger than %d bytes: send less (files and archives are streamed, not JSON)", mbe.Limit)
	}
	writeJSON(w, status, apiError{Code: code, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decode reads a JSON body into v: at most maxJSONBody bytes, no unknown
// fields, nothing after the value. An empty body leaves v as it is when
// optional.
func decode(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	body := http.MaxBytesReader(w, r.Body, maxJSONBody)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if errors.Is(err, io.EOF) && optional {
		return nil
	}
	if err == nil && dec.More() {
		err = errors.New("more data after the JSON value")
	}
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("more data after the JSON value")
		}
	}
	if err == nil {
		return nil
	}
	var (
		mbe *http.MaxBytesError
		se  *json.SyntaxError
		te  *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &mbe):
		return err
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: the request needs a JSON body (see GET /v1/openapi.json)", smolvm.ErrInvalid)
	case errors.As(err, &se):
		return fmt.Errorf("%w: malformed JSON at byte %d: %v", smolvm.ErrInvalid, se.Offset, se)
	case errors.As(err, &te):
		return fmt.Errorf("%w: field %q is a JSON %s, it must be %s", smolvm.ErrInvalid, te.Field, te.Value, jsonType(te.Type.String()))
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return fmt.Errorf("%w: %s: the body's fields are in GET /v1/openapi.json", smolvm.ErrInvalid, strings.TrimPrefix(err.Error(), "json: "))
	}
	return fmt.Errorf("%w: read the JSON body: %v", smolvm.ErrInvalid, err)
}

func jsonType(goType string) string {
	switch {
	case strings.HasPrefix(goType, "int"), strings.HasPrefix(goType, "uint"), strings.HasPrefix(goType, "float"):
		return "a number"
	case goType == "string":
		return "a string"
	case goType == "bool":
		return "true or false"
	case strings.HasPrefix(goType, "map"), strings.HasPrefix(goType, "struct"), strings.HasPrefix(goType, "server."):
		return "an object"
	case strings.HasPrefix(goType, "[]"):
		return "an array"
	}
	return goType
}

// sandboxJSON is a sandbox as /v1 shows it.
type sandboxJSON struct {
	ID        string            `json:"id"`
	Image     string            `json:"image"`
	Metadata  map[string]string `json:"metadata"`
	CPUs      int               `json:"cpus"`
	MemoryMiB int               `json:"memory_mib"`
	CreatedAt time.Time         `json:"created_at"`
	ExpiresAt *time.Time        `json:"expires_at,omitempty"`
	AutoPause bool              `json:"auto_pause,omitempty"`
	State     string            `json:"state"`
}

func sandboxOut(sb *Sandbox) sandboxJSON {
	out := sandboxJSON{ID: sb.ID, Image: sb.Template, Metadata: sb.Metadata, CPUs: sb.CPUs, MemoryMiB: sb.MemoryMiB,
		CreatedAt: sb.CreatedAt, AutoPause: sb.AutoPause, State: sb.State}
	if out.Metadata == nil {
		out.Metadata = map[string]string{}
	}
	if !sb.ExpiresAt.IsZero() {
		t := sb.ExpiresAt
		out.ExpiresAt = &t
	}
	return out
}

// sandboxOptions are what a new sandbox and a restored one both take.
type sandboxOptions struct {
	Network string         `json:"network"`
	Egress  *smolvm.Egress `json:"egress"`
	Ports   []string       `json:"ports"`
	// Hosts are name → IPv4 entries the sandbox's DNS answers
	// (Config.Hosts, the CLI's --add-host): "app": ["127.0.0.1"] opens
	// the host's loopback to the guest as app.
	Hosts     map[string][]string `json:"hosts"`
	Env       map[string]string   `json:"env"`
	Metadata  map[string]string   `json:"metadata"`
	Timeout   int64               `json:"timeout"`
	AutoPause bool                `json:"auto_pause"`
}

type createBody struct {
	Image       string `json:"image"`
	CPUs        int    `json:"cpus"`
	MemoryMiB   int    `json:"memory_mib"`
	DiskMode    string `json:"disk_mode"`
	DiskSizeMiB int    `json:"disk_size_mib"`
	// Mounts are host folders (v1_mounts.go).
	Mounts []mountJSON `json:"mounts"`
	sandboxOptions
}

// request turns the options into the registry's request; loopback says
// whether hosts may map a name to the host's loopback (--allow-host-loopback).
func (o *sandboxOptions) request(loopback bool) (CreateRequest, error) {
	switch o.Network {
	case "", "user", "none", "tap":
	default:
		return CreateRequest{}, fmt.Errorf("%w: network %q: use user, none or tap", smolvm.ErrInvalid, o.Network)
	}
	if o.Timeout < -1 || o.Timeout > maxTimeoutSeconds {
		return CreateRequest{}, fmt.Errorf("%w: timeout %d: give seconds from 1 to %d, 0 for the server's default or -1 for never", smolvm.ErrInvalid, o.Timeout, maxTimeoutSeconds)
	}
	if err := checkHosts(o.Hosts, loopback); err != nil {
		return CreateRequest{}, err
	}
	req := CreateRequest{Metadata: o.Metadata, EnvVars: o.Env, Timeout: time.Duration(o.Timeout) * time.Second, AutoPause: o.AutoPause,
		Config: smolvm.Config{Network: o.Network, Ports: o.Ports, Hosts: o.Hosts}}
	if o.Egress != nil {
		req.Config.Egress = *o.Egress
	}
	return req, nil
}

// maxHosts and maxHostAddrs bound a body's hosts; the library checks
// each name and address (network.Config).
const (
	maxHosts     = 64
	maxHostAddrs = 8
)

// checkHosts bounds hosts and refuses a name mapped to the host's
// loopback unless the operator allows it: such a name opens every service
// bound to 127.0.0.1 on the server's host, the server's own included, to
// the sandbox, which an API caller must not get by asking.
func checkHosts(hosts map[string][]string, loopback bool) error {
	if len(hosts) > maxHosts {
		return fmt.Errorf("%w: %d hosts: at most %d names", smolvm.ErrInvalid, len(hosts), maxHosts)
	}
	for name, addrs := range hosts {
		if len(name) > 253 {
			return fmt.Errorf("%w: hosts: a name of %d bytes: at most 253", smolvm.ErrInvalid, len(name))
		}
		if len(addrs) == 0 || len(addrs) > maxHostAddrs {
			return fmt.Errorf("%w: hosts: %q has %d addresses: give 1 to %d", smolvm.ErrInvalid, name, len(addrs), maxHostAddrs)
		}
		for _, a := range addrs {
			if ip, err := netip.ParseAddr(a); err == nil && ip.IsLoopback() && !loopback {
				return fmt.Errorf("%w: hosts: %s → %s would open the host's loopback (every service bound to it, this server's included) to the sandbox, which this server does not allow: its operator can with 'smolvm serve --allow-host-loopback'", smolvm.ErrInvalid, name, a)
			}
		}
	}
	return nil
}

// maxTimeoutSeconds bounds a timeout (a year).
const maxTimeoutSeconds = 365 * 24 * 3600

func (s *Server) createSandbox(w http.ResponseWriter, r *http.Request) error {
	var body createBody
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	req, err := body.request(s.opts.AllowHostLoopback)
	if err != nil {
		return err
	}
	if body.Image == smolvm.DefaultImage {
		body.Image = ""
	}
	req.Template = body.Image
	req.Config.VCPUs, req.Config.MemoryMiB = body.CPUs, body.MemoryMiB
	req.Config.DiskMode, req.Config.DiskSizeMiB = body.DiskMode, body.DiskSizeMiB
	if req.Config.Mounts, err = s.mounts(body.Mounts); err != nil {
		return err
	}
	if err := s.checkBrowserImage(r.Context(), body.Image); err != nil {
		return err
	}
	sb, err := s.reg.Create(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, sandboxOut(sb))
	return nil
}

func (s *Server) listSandboxes(w http.ResponseWriter, r *http.Request) error {
	filter := map[string]string{}
	for _, l := range r.URL.Query()["label"] {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return fmt.Errorf("%w: label %q: give KEY=VALUE", smolvm.ErrInvalid, l)
		}
		filter[k] = v
	}
	list, err := s.reg.List(r.Context(), filter)
	if err != nil {
		return err
	}
	out := make([]sandboxJSON, 0, len(list))
	for _, sb := range list {
		out = append(out, sandboxOut(sb))
	}
	writeJSON(w, http.StatusOK, map[string]any{"sandboxes": out})
	return nil
}

func (s *Server) getSandbox(w http.ResponseWriter, r *http.Request) error {
	sb, err := s.reg.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sandboxOut(sb))
	return nil
}

func (s *Server) deleteSandbox(w http.ResponseWriter, r *http.Request) error {
	if err := s.reg.Delete(r.Context(), r.PathValue("id")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) pauseSandbox(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	if err := s.reg.Pause(r.Context(), id); err != nil {
		return err
	}
	return s.getSandbox(w, r)
}

type timeoutBody struct {
	Timeout int64 `json:"timeout"`
}

func (b timeoutBody) duration() (time.Duration, error) {
	if b.Timeout < -1 || b.Timeout > maxTimeoutSeconds {
		return 0, fmt.Errorf("%w: timeout %d: give seconds from 1 to %d, 0 for the server's default or -1 for never", smolvm.ErrInvalid, b.Timeout, maxTimeoutSeconds)
	}
	return time.Duration(b.Timeout) * time.Second, nil
}

func (s *Server) resumeSandbox(w http.ResponseWriter, r *http.Request) error {
	var body timeoutBody
	if err := decode(w, r, &body, true); err != nil {
		return err
	}
	d, err := body.duration()
	if err != nil {
		return err
	}
	sb, err := s.reg.Resume(r.Context(), r.PathValue("id"), d)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sandboxOut(sb))
	return nil
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request) error {
	var body timeoutBody
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	d, err := body.duration()
	if err != nil {
		return err
	}
	if d == 0 {
		d = s.opts.DefaultTimeout
	}
	if err := s.reg.SetTimeout(r.Context(), r.PathValue("id"), d); err != nil {
		return err
	}
	return s.getSandbox(w, r)
}

// vm is the VM of the request's sandbox.
func (s *Server) vm(r *http.Request) (*smolvm.VM, error) {
	return s.reg.VM(r.Context(), r.PathValue("id"))
}

func (s *Server) getEnv(w http.ResponseWriter, r *http.Request) error {
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	env, err := vm.Env(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]any{"env": env})
	return nil
}

func (s *Server) updateEnv(w http.ResponseWriter, r *http.Request) error {
	var body struct {
		Set   map[string]string `json:"set"`
		Unset []string          `json:"unset"`
	}
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	ctx := r.Context()
	if len(body.Set) > 0 {
		if err := vm.SetEnv(ctx, body.Set); err != nil {
			return err
		}
	}
	if len(body.Unset) > 0 {
		if err := vm.UnsetEnv(ctx, body.Unset...); err != nil {
			return err
		}
	}
	return s.getEnv(w, r)
}

func (s *Server) listPorts(w http.ResponseWriter, r *http.Request) error {
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	ports, err := vm.Ports(r.Context())
	if err != nil {
		return err
	}
	if ports == nil {
		ports = []smolvm.PortForward{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"ports": ports})
	return nil
}

func (s *Server) exposePort(w http.ResponseWriter, r *http.Request) error {
	var body struct {
		Spec string `json:"spec"`
	}
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	pf, err := vm.ExposePort(r.Context(), body.Spec)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, pf)
	return nil
}

func (s *Server) closePort(w http.ResponseWriter, r *http.Request) error {
	port, err := strconv.Atoi(r.PathValue("host_port"))
	if err != nil || port < 1 || port > 65535 {
		return fmt.Errorf("%w: host port %q: give a number from 1 to 65535", smolvm.ErrInvalid, r.PathValue("host_port"))
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	if err := vm.ClosePort(r.Context(), port); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request) error {
	var body struct {
		Name string `json:"name"`
	}
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	sn, err := vm.Snapshot(r.Context(), body.Name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, sn)
	return nil
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) error {
	sns, err := s.reg.host.Snapshots(r.Context())
	if err != nil {
		return err
	}
	out := []*smolvm.SnapshotInfo{}
	for _, sn := range sns {
		if !sn.Warm { // the warm snapshots are smolvm's own
			out = append(out, sn)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"snapshots": out})
	return nil
}

func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request) error {
	if err := s.reg.host.DeleteSnapshot(r.Context(), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) restoreSnapshot(w http.ResponseWriter, r *http.Request) error {
	var body sandboxOptions
	if err := decode(w, r, &body, true); err != nil {
		return err
	}
	req, err := body.request(s.opts.AllowHostLoopback)
	if err != nil {
		return err
	}
	req.Snapshot = r.PathValue("name")
	sb, err := s.reg.Create(r.Context(), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, sandboxOut(sb))
	return nil
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) error {
	ims, err := s.reg.host.Images(r.Context())
	if err != nil {
		return err
	}
	if ims == nil {
		ims = []*smolvm.ImageInfo{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"images": ims})
	return nil
}

// shutdownCtx is a context that ends with the request or the server.
func (s *Server) shutdownCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}
