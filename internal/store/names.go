package store

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
)

// Word lists for generated VM names ("brave-otter").
var (
	adjectives = []string{
		"agile", "amber", "bold", "brave", "brisk", "calm", "clever", "cosmic",
		"crisp", "curious", "daring", "eager", "fancy", "fierce", "gentle", "glad",
		"golden", "happy", "jolly", "keen", "lively", "lucky", "mellow", "merry",
		"nimble", "noble", "plucky", "quick", "quiet", "rapid", "shiny", "silent",
		"snappy", "steady", "sunny", "swift", "tidy", "vivid", "witty", "zesty",
	}
	nouns = []string{
		"badger", "beaver", "bison", "cobra", "comet", "condor", "coral", "crane",
		"falcon", "ferret", "finch", "fox", "gecko", "heron", "ibis", "jackal",
		"koala", "lemur", "lynx", "marmot", "meteor", "newt", "nova", "ocelot",
		"orca", "otter", "panda", "pulsar", "quasar", "raven", "robin", "salmon",
		"seal", "sparrow", "tapir", "tiger", "walrus", "wombat", "yak", "zebra",
	}
)

// randomName returns a random "adjective-noun" pair.
func randomName() string {
	return adjectives[rand.IntN(len(adjectives))] + "-" + nouns[rand.IntN(len(nouns))]
}

// nameAttempts is how many random pairs generateName tries before falling
// back to a numeric suffix.
const nameAttempts = 16

// generateName returns an unused VM name. It must run inside the write
// transaction that inserts the VM so the name stays unique across processes.
func generateName(ctx context.Context, tx *sql.Tx) (string, error) {
	free := func(name string) (bool, error) {
		owner, err := nameOwner(ctx, tx, name)
		return owner == "", err
	}
	for range nameAttempts {
		name := randomName()
		ok, err := free(name)
		if err != nil {
			return "", err
		}
		if ok {
			return name, nil
		}
	}
	base := randomName()
	for n := 2; ; n++ {
		name := fmt.Sprintf("%s-%d", base, n)
		ok, err := free(name)
		if err != nil {
			return "", err
		}
		if ok {
			return name, nil
		}
	}
}
