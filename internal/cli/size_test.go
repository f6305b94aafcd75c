package cli

import "testing"

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4096", 4096, true},
		{"64K", 64 << 10, true},
		{"64k", 64 << 10, true},
		{"64KiB", 64 << 10, true},
		{"64 KiB", 64 << 10, true},
		{"64KB", 64 << 10, true},
		{"1.5 GiB", 3 << 29, true},
		{"1.5G", 3 << 29, true},
		{"2T", 2 << 40, true},
		{"512B", 512, true},
		{"0", 0, true},
		{"", 0, false},
		{"K", 0, false},
		{"-1", 0, false},
		{"1.3K", 1331, true}, // 1331.2 bytes, rounded
		{"12X", 0, false},
		{"8E", 0, false}, // overflows int64
		{"1e3", 0, false},
		{"abc", 0, false},
	}
	for _, tt := range tests {
		got, err := parseSize(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != tt.want) {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestFormatSize(t *testing.T) {
	tests := []struct {
		in   int64
		want string
	}{
		{0, "0 B"},
		{512, "512 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{64 << 10, "64 KiB"},
		{77 << 20, "77 MiB"},
		{3 << 29, "1.5 GiB"},
		{1<<30 + 1, "1 GiB"}, // rounds to one decimal, then drops ".0"
		{1536, "1.5 KiB"},
		{5 << 40, "5 TiB"},
	}
	for _, tt := range tests {
		if got := formatSize(tt.in); got != tt.want {
			t.Errorf("formatSize(%d) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// Every formatted size parses back to a value within the shown precision.
func TestSizeRoundTrip(t *testing.T) {
	for _, n := range []int64{1, 1024, 64 << 10, 3 << 29, 77 << 20, 1 << 62} {
		back, err := parseSize(formatSize(n))
		if err != nil || back != n {
			t.Errorf("%d → %q → %d, %v", n, formatSize(n), back, err)
		}
	}
}

// FuzzParseSize: any input either fails or yields a non-negative size whose
// rendering parses back to within the rendering's precision.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"64K", "1.5 GiB", "4096", "0.5k", "8E", "1e3", "12 B", " 3 MiB "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		back, err := parseSize(formatSize(n))
		if err != nil {
			t.Fatalf("formatSize(%d) = %q does not parse: %v", n, formatSize(n), err)
		}
		// One decimal of the unit: within 5% of a unit ≤ 5% of n.
		if d := back - n; d > n/20+1 || -d > n/20+1 {
			t.Fatalf("%q → %d → %q → %d", s, n, formatSize(n), back)
		}
	})
}

// TestParseSizeErrors: a negative size says so; anything else unreadable
// is "not a number".
func TestParseSizeErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"-5M", `size "-5M" is negative`},
		{"-1", `size "-1" is negative`},
		{" -1.5 GiB", `size " -1.5 GiB" is negative`},
		{"-", `size "-": not a number`},
		{"-K", `size "-K": not a number`},
		{"--5", `size "--5": not a number`},
		{"-abc", `size "-abc": not a number`},
		{"64Q", `size "64Q": not a number`},
		{"", `size "" has no number`},
		{"8E", `size "8E" is too large`},
	} {
		_, err := parseSize(tt.in)
		if err == nil || err.Error() != tt.want {
			t.Errorf("parseSize(%q): %v, want %s", tt.in, err, tt.want)
		}
	}
}
