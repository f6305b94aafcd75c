module github.com/nbdsnap/nbdsnap

go 1.26

require (
	github.com/coreos/go-systemd/v22 v22.6.0
	github.com/google/uuid v1.6.0
	github.com/hanwen/go-fuse/v2 v2.11.0
	github.com/spf13/cobra v1.10.1
	github.com/spf13/pflag v1.0.9
	golang.org/x/sys v0.38.0
)

require (
	github.com/cpuguy83/go-md2man/v2 v2.0.6 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/russross/blackfriday/v2 v2.1.0 // indirect
	gopkg.in/yaml.v3 v3.0.1 // indirect
)
