// CoreDNS for the real test node (tests/cluster/realnode.py): upstream's coremain with only the
// plugins the node's Corefile uses. This is CoreDNS's own compile-time plugin selection (what its
// plugin.cfg generates), so a cold build skips the cloud-provider plugins and their SDKs.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func main() {
	coremain.Run()
}
