package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newImageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "image",
		Aliases: []string{"images"},
		Short:   "Build, import, list and remove disk images",
		Long: `Disk images are ext4 root disks VMs boot with --image NAME: built from Debian
packages (image build) or from OCI / Docker images (image pull, image import).
"default" is the built-in initramfs image.

  smolvm image build python                  # python3, pip, venv, git, curl
  smolvm image build dev --debian bookworm --packages build-essential,git --size 4G
  smolvm image pull docker.io/library/debian:bookworm
  smolvm run --image python -- python3 -c 'print(6*7)'`,
	}
	cmd.AddCommand(newImageLsCmd(g), newImageInspectCmd(g), newImageRmCmd(g), newImagePruneCmd(g),
		newImageBuildCmd(g), newImagePullCmd(g), newImageImportCmd(g))
	return cmd
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.0fM", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.0fK", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

func newImageLsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ims, err := g.h.Images(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if ims == nil {
					ims = []*smolvm.ImageInfo{}
				}
				return printJSON(ims)
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tKIND\tSIZE\tON DISK\tCREATED\tUSED BY\tSOURCE")
			for _, im := range ims {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", im.Name, im.Kind, humanBytes(im.Size), humanBytes(im.DiskUsage),
					ago(im.Created), len(im.UsedBy), im.Source)
			}
			return w.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newImageInspectCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show an image's metadata and run config as JSON (exit 2 when there is none)",
		Long: `Show an image's metadata as JSON: kind, source, digest, disk, the VMs and
snapshots that use it, and an OCI image's run config ("config": env,
working_dir, user, entrypoint, cmd, exposed_ports), which every command
in a VM of the image starts with.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			im, err := g.h.InspectImage(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printJSON(im)
		},
	}
	cmd.Flags().Bool("json", true, "print JSON (the only format)")
	return cmd
}

func newImageRmCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove", "delete"},
		Short:   "Remove images (refused while a VM uses them)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var first error
			for _, n := range args {
				if err := g.h.RemoveImage(cmd.Context(), n); err != nil {
					fmt.Fprintln(os.Stderr, "smolvm:", err)
					if first == nil {
						first = err
					}
					continue
				}
				fmt.Println(n)
			}
			if first != nil {
				return &exitError{code: exitCode(first)}
			}
			return nil
		},
	}
}

func newImagePruneCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Remove the images no VM uses and the build caches they leave",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			rep, err := g.h.PruneImages(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(rep)
			}
			for _, n := range rep.Images {
				fmt.Println("removed image", n)
			}
			for _, n := range rep.Cache {
				fmt.Println("removed cache", n)
			}
			fmt.Printf("freed %s\n", humanBytes(rep.Freed))
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printBuilt(im *smolvm.ImageInfo) {
	fmt.Fprintf(os.Stderr, "image %s: %s (%s on disk), %s\n", im.Name, humanBytes(im.Size), humanBytes(im.DiskUsage), im.Digest)
	fmt.Println(im.Name)
}

func newImageBuildCmd(g *globals) *cobra.Command {
	var (
		suite, packages, run, size, variant, mirror string
	)
	cmd := &cobra.Command{
		Use:   "build NAME",
		Short: "Build a Debian image with mmdebstrap (needs root)",
		Long: `Build a root disk from Debian packages with mmdebstrap, install the guest agent
and write it as ext4 (mkfs.ext4 -d, no loop mounts). Builds are cached by a
fingerprint of their inputs. Needs root, mmdebstrap and e2fsprogs.

Ready recipes (NAME with no --packages): ` + recipeList(),
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			mb, err := smolvm.ParseSizeMiB(size)
			if err != nil {
				return err
			}
			var pk []string
			for _, p := range strings.Split(packages, ",") {
				if p = strings.TrimSpace(p); p != "" {
					pk = append(pk, p)
				}
			}
			im, err := g.h.BuildImage(cmd.Context(), smolvm.BuildOptions{Name: args[0], Suite: suite, Variant: variant,
				Packages: pk, Script: run, Mirror: mirror, SizeMiB: mb, Progress: os.Stderr})
			if err != nil {
				return err
			}
			printBuilt(im)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&suite, "debian", "", "Debian suite (default bookworm)")
	f.StringVar(&packages, "packages", "", "comma-separated packages to install")
	f.StringVar(&run, "run", "", "shell script run in the image after the packages")
	f.StringVar(&size, "size", "", "disk size, e.g. 2G (default: the files plus room)")
	f.StringVar(&variant, "variant", "", "mmdebstrap variant: minbase (default) or apt")
	f.StringVar(&mirror, "mirror", "", "Debian mirror (default: the host's apt mirror)")
	return cmd
}

func recipeList() string {
	var out []string
	for n, r := range smolvm.Recipes() {
		out = append(out, n+" ("+strings.Join(r.Packages, ", ")+")")
	}
	return strings.Join(out, "; ")
}

func newImagePullCmd(g *globals) *cobra.Command {
	var name, size string
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an OCI image from a registry and make it a bootable disk image (needs root)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			mb, err := smolvm.ParseSizeMiB(size)
			if err != nil {
				return err
			}
			im, err := g.h.ImportImage(cmd.Context(), smolvm.ImportOptions{Name: name, Ref: args[0], SizeMiB: mb, Progress: os.Stderr})
			if err != nil {
				return err
			}
			printBuilt(im)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "image name (default: from the reference)")
	cmd.Flags().StringVar(&size, "size", "", "disk size, e.g. 2G (default: the files plus room)")
	return cmd
}

func newImageImportCmd(g *globals) *cobra.Command {
	var name, size string
	cmd := &cobra.Command{
		Use:   "import FILE",
		Short: "Import an OCI layout (folder or tar) or a docker save tarball (needs root)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			mb, err := smolvm.ParseSizeMiB(size)
			if err != nil {
				return err
			}
			im, err := g.h.ImportImage(cmd.Context(), smolvm.ImportOptions{Name: name, File: args[0], SizeMiB: mb, Progress: os.Stderr})
			if err != nil {
				return err
			}
			printBuilt(im)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "image name (default: from the file name)")
	cmd.Flags().StringVar(&size, "size", "", "disk size, e.g. 2G (default: the files plus room)")
	return cmd
}
