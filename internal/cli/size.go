package cli

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Sizes on the command line and in output are binary: 1K = 1 KiB = 1024
// bytes, as in lvcreate and qemu-img. "64K", "64KiB", "64 KiB", "1.5G",
// "1.5 GiB" and a plain byte count "4096" are all accepted; a fraction is
// rounded to the nearest byte.
var units = []struct {
	suffix string
	shift  uint
}{
	{"E", 60}, {"P", 50}, {"T", 40}, {"G", 30}, {"M", 20}, {"K", 10},
}

// parseSize parses a human size.
func parseSize(s string) (int64, error) {
	num, shift := splitUnit(strings.TrimSpace(s))
	if num == "" {
		return 0, fmt.Errorf("size %q has no number", s)
	}
	// "-5M" is a size with a minus, not a malformed number: say so. (One
	// level of recursion at most: rest cannot start with a minus.)
	if rest, ok := strings.CutPrefix(strings.TrimSpace(s), "-"); ok {
		if !strings.HasPrefix(strings.TrimSpace(rest), "-") {
			if _, err := parseSize(rest); err == nil {
				return 0, fmt.Errorf("size %q is negative", s)
			}
		}
		return 0, fmt.Errorf("size %q: not a number", s)
	}
	if !strings.Contains(num, ".") {
		n, err := strconv.ParseUint(num, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("size %q: not a number", s)
		}
		if n > math.MaxInt64>>shift {
			return 0, fmt.Errorf("size %q is too large", s)
		}
		return int64(n << shift), nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("size %q: not a number", s)
	}
	v := f * float64(uint64(1)<<shift)
	if v >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	// A fraction rounds to the nearest byte, so that every size this
	// package prints ("1.1 KiB") reads back.
	return int64(math.Round(v)), nil
}

// splitUnit splits "1.5 GiB" into "1.5" and 30.
func splitUnit(t string) (num string, shift uint) {
	up := strings.ToUpper(t)
	for _, u := range units {
		for _, suf := range []string{u.suffix + "IB", u.suffix + "B", u.suffix} {
			if strings.HasSuffix(up, suf) {
				return strings.TrimSpace(t[:len(t)-len(suf)]), u.shift
			}
		}
	}
	if strings.HasSuffix(up, "B") {
		return strings.TrimSpace(t[:len(t)-1]), 0
	}
	return t, 0
}

// formatSize renders n bytes for humans: "512 B", "64 KiB", "1.5 GiB". A
// value that is not a whole number of its unit is shown with one decimal.
func formatSize(n int64) string {
	if n < 1024 {
		return strconv.FormatInt(n, 10) + " B"
	}
	for _, u := range units {
		unit := int64(1) << u.shift
		if n < unit {
			continue
		}
		if n%unit == 0 {
			return fmt.Sprintf("%d %siB", n/unit, u.suffix)
		}
		s := strconv.FormatFloat(float64(n)/float64(unit), 'f', 1, 64)
		return strings.TrimSuffix(s, ".0") + " " + u.suffix + "iB"
	}
	return strconv.FormatInt(n, 10) + " B" // unreachable: n >= 1024 matches K
}

// sizeFlag is a pflag.Value holding a human size.
type sizeFlag struct{ n *int64 }

func (f sizeFlag) String() string {
	if f.n == nil || *f.n == 0 {
		return "0"
	}
	return formatSize(*f.n)
}

func (f sizeFlag) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*f.n = n
	return nil
}

func (sizeFlag) Type() string { return "size" }

// shortSize renders a size the way it is typed: "4K", "1M".
func shortSize(n int64) string {
	return strings.Replace(strings.TrimSuffix(formatSize(n), "iB"), " ", "", 1)
}
