set terminal pngcairo size 1600,1040 font 'Sans,10'
set output 'bench/results/2026-11-24T2323Z/chart.png'
set multiplot layout 2,1
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.9 border -1
set datafile missing '-'
set datafile separator '\t'
set yrange [0:1.1]
set ytics 0.2
set grid ytics
set key top right horizontal
set xtics rotate by -35 font 'Sans,9'
set ylabel 'median / best server (1 = fastest)'
set bmargin 7
set title 'nbdsnap vs nbdkit vs QEMU fleecing, origin and stores in shm (/dev/shm), fio nbd, medians of 3 runs'
plot 'bench/results/2026-11-24T2323Z/chart-shm.dat' using 2:xtic(1) title columnhead lc rgb '#888888', '' using 3 title columnhead lc rgb '#d95f02', '' using 4 title columnhead lc rgb '#1b9e77', '' using 5 title columnhead lc rgb '#7570b3'
set title 'nbdsnap vs nbdkit vs QEMU fleecing, origin and stores in disk (/var/tmp), fio nbd, medians of 3 runs'
plot 'bench/results/2026-11-24T2323Z/chart-disk.dat' using 2:xtic(1) title columnhead lc rgb '#888888', '' using 3 title columnhead lc rgb '#d95f02', '' using 4 title columnhead lc rgb '#1b9e77', '' using 5 title columnhead lc rgb '#7570b3'
unset multiplot
