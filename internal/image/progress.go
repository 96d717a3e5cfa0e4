package image

import (
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress draws spinners for long steps, only on a terminal.
type progress struct {
	w io.Writer // nil = silent
}

func newProgress(w io.Writer) *progress {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return &progress{}
	}
	return &progress{w: w}
}

// step shows a spinner with desc until the returned func is called.
func (p *progress) step(desc string) func() {
	if p == nil || p.w == nil {
		return func() {}
	}
	bar := progressbar.NewOptions(-1,
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionClearOnFinish(),
	)
	stop := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				_ = bar.Add(1)
			}
		}
	}()
	var closed bool
	return func() {
		if closed {
			return
		}
		closed = true
		close(stop)
		<-finished
		_ = bar.Finish()
	}
}

// switchTo ends the step behind done and starts a new one.
func (p *progress) switchTo(done func(), desc string) func() {
	done()
	return p.step(desc)
}
