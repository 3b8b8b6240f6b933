"""One module per op family: public function, autograd and backend dispatch."""
