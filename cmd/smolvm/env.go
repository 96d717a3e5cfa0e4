package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm"
)

func newEnvCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "env",
		Short: "Manage a VM's persistent environment variables",
		Long: `Manage the sandbox environment of a VM: variables every later exec, run
and shell in it sees (written to /etc/smolvm/env and /etc/profile.d).`,
		Example: `  smolvm env set web API_URL=http://localhost:8080 DEBUG=1
  smolvm env ls web
  smolvm env unset web DEBUG`,
	}
	cmd.AddCommand(newEnvSetCmd(g), newEnvUnsetCmd(g), newEnvLsCmd(g))
	return cmd
}

func newEnvSetCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "set VM KEY=VALUE...",
		Short: "Set environment variables",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vars, err := smolvm.ParseEnv(args[1:])
			if err != nil {
				return err
			}
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			return vm.SetEnv(cmd.Context(), vars)
		},
	}
}

func newEnvUnsetCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "unset VM KEY...",
		Short: "Remove environment variables",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			return vm.UnsetEnv(cmd.Context(), args[1:]...)
		},
	}
}

func newEnvLsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls VM",
		Aliases: []string{"list"},
		Short:   "List environment variables as KEY=VALUE lines",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := g.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer vm.Close()
			env, err := vm.Env(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(env)
			}
			keys := make([]string, 0, len(env))
			for k := range env {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				fmt.Printf("%s=%s\n", k, env[k])
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON object")
	return cmd
}
