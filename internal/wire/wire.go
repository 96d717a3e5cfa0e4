// Package wire holds what the host and the guest agent must agree on
// outside the protobuf messages: file paths in the guest and the formats of
// the files the host writes for the agent. It imports nothing of either
// side, so both can use it.
package wire

import (
	"encoding/json"
	"fmt"
)

// The agent's two channels: the gRPC service and the fast lane, each a
// virtio-serial port by name or a vsock port, as the VM has them.
const (
	AgentPortName  = "org.smolvm.agent"
	FastPortName   = "org.smolvm.fast"
	AgentVsockPort = 1024
	FastVsockPort  = 1025
)

// Boot options on the kernel command line that the host sets and the agent
// reads (KEY=VALUE).
const (
	ParamHostname = "smolvm.hostname" // the guest's hostname
	ParamDebug    = "smolvm.debug"    // 1, true or yes: the agent logs at debug level
	ParamNet      = "smolvm.net"      // ADDR/PREFIX,GATEWAY,DNS: eth0's configuration
	ParamRoot     = "smolvm.root"     // the root disk's device (/dev/vda)
	ParamRootMode = "smolvm.rootmode" // ro or rw
	ParamRootGrow = "smolvm.rootgrow" // 1: grow the root file system to its disk
)

// ModulesPath is the file in the initramfs that lists the kernel module
// files the agent loads, in order.
const ModulesPath = "/etc/smolvm/modules"

// ImageConfigPath is where an image's run config is stored in its disk;
// the agent reads it when it starts in that root.
const ImageConfigPath = "/etc/smolvm/image.json"

// MaxImageConfigSize bounds the config file the agent reads.
const MaxImageConfigSize = 1 << 20

// ImageConfig is the part of an OCI image's config that decides how its
// commands run, as `docker run` applies it.
type ImageConfig struct {
	// Image names the image in error messages (its reference or file).
	Image      string   `json:"image,omitempty"`
	Env        []string `json:"env,omitempty"`         // KEY=VALUE, under the sandbox's and the command's
	WorkingDir string   `json:"working_dir,omitempty"` // default folder of every command
	User       string   `json:"user,omitempty"`        // name, uid, name:group or uid:gid
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	// ExposedPorts are information only ("8080/tcp").
	ExposedPorts []string `json:"exposed_ports,omitempty"`
}

// Empty says whether the config changes nothing.
func (c *ImageConfig) Empty() bool {
	return c == nil || len(c.Env) == 0 && c.WorkingDir == "" && c.User == "" && len(c.Entrypoint) == 0 && len(c.Cmd) == 0 && len(c.ExposedPorts) == 0
}

// ParseImageConfig decodes an image config file.
func ParseImageConfig(data []byte) (*ImageConfig, error) {
	if len(data) > MaxImageConfigSize {
		return nil, fmt.Errorf("image config: %d bytes, more than %d", len(data), MaxImageConfigSize)
	}
	var c ImageConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	return &c, nil
}
