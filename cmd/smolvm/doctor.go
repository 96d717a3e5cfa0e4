package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newDoctorCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:         "doctor",
		Annotations: map[string]string{noHost: "it checks the state folder itself"},
		Short:       "Check this host: QEMU, KVM or TCG, image, state folder",
		Args:        cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			checks := smolvm.CheckHost(cmd.Context(), g.home)
			ok := true
			for _, c := range checks {
				ok = ok && c.OK
			}
			if asJSON {
				if err := printJSON(map[string]any{"ok": ok, "checks": checks}); err != nil {
					return err
				}
			} else {
				for _, c := range checks {
					mark := "ok  "
					if !c.OK {
						mark = "FAIL"
					}
					fmt.Printf("[%s] %-14s %s\n", mark, c.Name, c.Detail)
					if c.Fix != "" {
						fmt.Printf("       %-14s fix: %s\n", "", c.Fix)
					}
				}
			}
			if !ok {
				return &exitError{1}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
