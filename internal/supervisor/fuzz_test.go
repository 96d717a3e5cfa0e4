package supervisor

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/smolvm/smolvm/internal/proto/agentpb"
)

// FuzzLaneExecStart decodes an api.sock client's first Exec message, as
// the proxy does to see whether the fast lane can run it: any bytes are a
// start the lane can run (no stdin, no terminal) or nil, and the codec
// passes them through unchanged.
func FuzzLaneExecStart(f *testing.F) {
	for _, m := range []*agentpb.ExecRequest{
		{Msg: &agentpb.ExecRequest_Start{Start: &agentpb.ExecStart{Argv: []string{"true"}}}},
		{Msg: &agentpb.ExecRequest_Start{Start: &agentpb.ExecStart{Shell: "cat", Stdin: true}}},
		{Msg: &agentpb.ExecRequest_Start{Start: &agentpb.ExecStart{Argv: []string{"sh"}, Tty: true, Env: []string{"A=B"}}}},
		{Msg: &agentpb.ExecRequest_Signal{Signal: 15}},
	} {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var fr frame
		if err := (codec{}).Unmarshal(data, &fr); err != nil {
			t.Fatal(err)
		}
		if out, _ := (codec{}).Marshal(&fr); string(out) != string(data) {
			t.Fatal("the codec changed a forwarded message")
		}
		if start := laneExecStart(&fr); start != nil && (start.GetStdin() || start.GetTty()) {
			t.Fatalf("the lane would run %v", start)
		}
	})
}
