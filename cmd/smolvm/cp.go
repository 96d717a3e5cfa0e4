package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

// cpArg is one side of 'smolvm cp': a local path, "-" or VM:PATH.
type cpArg struct {
	vm   string // "" for a local path
	path string
}

// parseCpArg reads VM:PATH the way docker cp reads CONTAINER:PATH: a local
// path with a colon must start with "/" or "." to be taken as local.
func parseCpArg(s string) cpArg {
	if s == "-" || strings.HasPrefix(s, "/") || strings.HasPrefix(s, ".") {
		return cpArg{path: s}
	}
	name, p, ok := strings.Cut(s, ":")
	if !ok || name == "" || strings.Contains(name, "/") {
		return cpArg{path: s}
	}
	if p == "" {
		p = "/root/"
	} else if !strings.HasPrefix(p, "/") {
		p = "/root/" + p // relative to the default working directory
	}
	return cpArg{vm: name, path: p}
}

func newCpCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy files and folders between a VM and the host",
		Long: `Copy files and folders between a VM and the host, like 'docker cp'.
Exactly one of SRC and DST is VM:PATH (a relative PATH is under /root).

  - Copying into an existing directory puts the source inside it.
  - Copying to a path that does not exist creates it (its parent must exist).
  - SRC ending in "/." copies the contents of a directory, not the directory.
  - Modes and modification times are kept; symlinks are copied as symlinks.
  - "-" as SRC reads a tar stream from stdin and extracts it into the VM
    directory DST; "-" as DST writes SRC as a tar stream to stdout.`,
		Example: `  smolvm cp ./project web:/root/          # -> /root/project
  smolvm cp web:/var/log/app.log .
  smolvm cp ./site/. web:/srv/www          # contents of site into /srv/www
  tar -C src -c . | smolvm cp - web:/srv/www
  smolvm cp web:/etc - | tar -t`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			src, dst := parseCpArg(args[0]), parseCpArg(args[1])
			switch {
			case src.vm != "" && dst.vm != "":
				return fmt.Errorf("%w: both SRC and DST are in a VM: copying between VMs is not supported, copy through the host", smolvm.ErrInvalid)
			case src.vm == "" && dst.vm == "":
				return fmt.Errorf("%w: both SRC and DST are local: name the VM side as VM:PATH (a local path with a colon must start with ./ or /)", smolvm.ErrInvalid)
			}
			name := src.vm + dst.vm
			vm, err := g.open(cmd.Context(), name)
			if err != nil {
				return err
			}
			defer vm.Close()
			ctx := cmd.Context()
			if dst.vm != "" {
				if src.path == "-" {
					if fi, err := vm.Stat(ctx, dst.path); err == nil && !fi.IsDir() {
						return fmt.Errorf("%w: %s:%s is not a directory: a tar stream from stdin is extracted into a directory", smolvm.ErrInvalid, name, dst.path)
					}
					return vm.PutArchive(ctx, path.Clean(dst.path), os.Stdin)
				}
				return cpErr(vm.Upload(ctx, src.path, dst.path))
			}
			if dst.path == "-" {
				_, err := vm.GetArchive(ctx, path.Clean(src.path), os.Stdout)
				return cpErr(err)
			}
			return cpErr(vm.Download(ctx, src.path, dst.path))
		},
	}
}

// cpErr makes a missing path an ErrNotFound too (exit code 2).
func cpErr(err error) error {
	if err != nil && errors.Is(err, fs.ErrNotExist) && !errors.Is(err, smolvm.ErrNotFound) {
		return notFound{err}
	}
	return err
}

type notFound struct{ error }

func (e notFound) Unwrap() error        { return e.error }
func (e notFound) Is(target error) bool { return target == smolvm.ErrNotFound }
