package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/smolvm/smolvm"
)

// checkBrowserImage refuses a sandbox of the browser image when the
// image is not built, naming the command that builds it.
func (s *Server) checkBrowserImage(ctx context.Context, image string) error {
	if image != smolvm.BrowserImage {
		return nil
	}
	_, err := s.reg.host.InspectImage(ctx, image)
	if errors.Is(err, smolvm.ErrNotFound) {
		return fmt.Errorf("image %q is %w on this server: build it with 'smolvm image build %s' (Debian's chromium and fonts, a few minutes)", image, smolvm.ErrNotFound, smolvm.BrowserImage)
	}
	return err
}

// startBrowser starts headless Chromium in the sandbox (one of the
// browser image) and forwards its DevTools to a host port.
func (s *Server) startBrowser(w http.ResponseWriter, r *http.Request) error {
	var body struct {
		HostPort int `json:"host_port"`
	}
	if err := decode(w, r, &body, true); err != nil {
		return err
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	b, err := smolvm.StartBrowser(r.Context(), vm, smolvm.BrowserOptions{HostPort: body.HostPort})
	if errors.Is(err, smolvm.ErrInvalid) && strings.Contains(err.Error(), "no chromium") {
		return fmt.Errorf("%w (on /v1: create the sandbox with \"image\": \"browser\")", err)
	}
	if err != nil {
		return err
	}
	b.VMID = r.PathValue("id") // the sandbox's id, not its VM's
	writeJSON(w, http.StatusCreated, b)
	return nil
}

// getBrowser is the sandbox's running browser (409 not_running without
// one).
func (s *Server) getBrowser(w http.ResponseWriter, r *http.Request) error {
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	b, err := openBrowser(r, vm)
	if err != nil {
		return err
	}
	b.VMID = r.PathValue("id")
	writeJSON(w, http.StatusOK, b)
	return nil
}

// stopBrowser ends the sandbox's browser and closes its forward; a
// sandbox without one is no error.
func (s *Server) stopBrowser(w http.ResponseWriter, r *http.Request) error {
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	if err := smolvm.StopBrowser(r.Context(), vm); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// screenshot opens a URL in the sandbox's running browser and answers
// the viewport as PNG.
func (s *Server) screenshot(w http.ResponseWriter, r *http.Request) error {
	var body struct {
		URL    string `json:"url"`
		Width  int    `json:"width"`
		Height int    `json:"height"`
	}
	if err := decode(w, r, &body, false); err != nil {
		return err
	}
	if body.URL == "" || body.Width < 0 || body.Height < 0 || body.Width > 8192 || body.Height > 8192 {
		return fmt.Errorf("%w: screenshot of %q at %dx%d: give a url, and a width and height from 1 to 8192 (0: 1280x800)", smolvm.ErrInvalid, body.URL, body.Width, body.Height)
	}
	vm, err := s.vm(r)
	if err != nil {
		return err
	}
	b, err := openBrowser(r, vm)
	if err != nil {
		return err
	}
	png, err := b.Screenshot(r.Context(), body.URL, smolvm.ScreenshotOptions{Width: body.Width, Height: body.Height})
	if err != nil && strings.Contains(err.Error(), "net::ERR_") {
		// The caller's URL: a name or address the sandbox's egress
		// denies, a refused connection.
		return fmt.Errorf("%w: the page did not load: %w", smolvm.ErrInvalid, err)
	}
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "image/png")
	w.Header().Set("Content-Length", strconv.Itoa(len(png)))
	w.WriteHeader(http.StatusOK)
	_, err = w.Write(png)
	return err
}

// openBrowser is the sandbox's running browser; without one the error
// names the API call that starts it.
func openBrowser(r *http.Request, vm *smolvm.VM) (*smolvm.Browser, error) {
	b, err := smolvm.OpenBrowser(r.Context(), vm)
	if errors.Is(err, smolvm.ErrNotRunning) {
		return nil, fmt.Errorf("sandbox %s has no browser %w: start it with POST /v1/sandboxes/%s/browser", r.PathValue("id"), smolvm.ErrNotRunning, r.PathValue("id"))
	}
	return b, err
}
